"""Chaos check: kill -9 resdistill commands at random points, rerun them, and check that what
they leave equals an uninterrupted run's, while S3 reads break mid-body.

    python benchmarks/chaos.py [--quick] [--rounds N] [--seed S] [--only CMD,...] [--keep]

World (``benchmarks/chaos_env.py``): tiny synthetic slides (``resdistill synth``), a moto S3
server on 127.0.0.1 behind a fault proxy (``tests/fault_proxy.py``) that resets or stalls a
connection part-way through a response, and one Ray head that every Ray-based command joins
(``--address``). The training data is on S3: the clean ``shard`` run's dataset, which
``teacher``, ``distill`` and ``teacher-targets`` read through the proxy; so are the slides
``predict`` classifies.

Rounds. Each round runs ``shard``, ``teacher``, ``teacher-targets``, ``distill`` and ``predict``
(``--only`` picks some), each as a subprocess in a process group of its own: started with a
fault plan armed on the proxy (reset or stall, after a random byte count, 2-4 times), killed
with SIGKILL (the whole group) at a seeded point, then rerun with the same arguments and a new
fault plan. A kill point is a random delay within the command's measured clean duration, or the
moment a marker appears (the lease taken, a first slide planned, a first shard published, a
first checkpoint being written or kept, a first targets file or prediction written); each is
printed. The rerun must exit 0 and its output pass its check (``benchmarks/chaos_checks.py``):
the dataset's manifest == its shards and == the clean samples; every checkpoint loads, the last
epoch is reached and the rerun's worker never restarted (a broken read is resumed where it
broke, not by Ray Train's --max-failures restarts); the targets verify and equal the clean set;
every slide's prediction equals the clean run's; no lease is left. A rerun refused because of
the killed run's lease is a finding, reported as is.

Bounds. Every subprocess has one (``BOUND_S``: synth 180 s, shard 240, teacher 360,
teacher-targets 300, distill 360, predict 360; ``--bound-scale`` multiplies them on a slow
machine); a run past it is killed and reported as a hang with its command line. S3 reads wait at
most 5 s for a byte (``RESDISTILL_S3_READ_TIMEOUT``), so a stall costs 5 s.

Ends with a table (command, round, kill point, rerun exit code, rerun seconds, S3 faults
injected, check) and exits 1 if any row failed. ``--quick`` is the small run the test suite uses
(``tests/test_chaos.py``): one round, 4 slides, 2 epochs, the in-process shard and targets,
markers only for the training commands (no clean training runs).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.chaos_checks import (  # noqa: E402
    CheckFailed,
    check_dataset,
    check_predictions,
    check_run,
    check_targets,
)
from benchmarks.chaos_env import BUCKET, World, group_alive, stop_group  # noqa: E402

COMMANDS = ("shard", "teacher", "teacher-targets", "distill", "predict")
#: Seconds each command may run before it counts as hung (times --bound-scale).
BOUND_S = {"synth": 180, "shard": 240, "teacher": 360, "teacher-targets": 300, "distill": 360,
           "predict": 360}  # fmt: skip
#: Seconds a command's process group may outlive its exit (helper processes winding down).
LINGER_S = 15
#: Per command, the markers a kill may wait for (see Chaos.marker for what each polls).
MARKERS = {
    "shard": ("lease taken", "first slide planned", "first shard published"),
    "teacher": ("lease taken", "first checkpoint", "first checkpoint kept"),
    "distill": ("lease taken", "first checkpoint", "first checkpoint kept"),
    "teacher-targets": ("lease taken", "first targets file"),
    "predict": ("lease taken", "first slide written"),
}
PY = [sys.executable, "-m", "resdistill"]


@dataclass
class Row:
    """One line of the table: a clean reference run, or a kill and its rerun."""

    command: str
    round: str
    kill: str = "-"
    rerun_rc: int | None = None
    seconds: float = 0.0
    faults: int = 0
    check: str = ""
    ok: bool = False


@dataclass
class Chaos:
    """Runs, kills and reruns the commands in ``world`` under ``work``; collects the rows."""

    world: World
    work: Path
    quick: bool
    seed: int
    scale: float
    rows: list[Row] = field(default_factory=list)
    clean_s: dict[str, float] = field(default_factory=dict)
    teacher: str | None = None  # the checkpoint targets, distill and predict use

    # ------------------------------------------------------------------ processes

    def bound(self, command: str) -> float:
        return BOUND_S[command] * self.scale

    def start(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        (self.work / "logs").mkdir(exist_ok=True)
        with open(self.work / "logs" / f"{log}.log", "wb") as fh:
            return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=self.work,
                                    env=self.world.env, stdin=subprocess.DEVNULL,
                                    start_new_session=True)  # fmt: skip

    def finish(
        self, proc: subprocess.Popen[bytes], argv: list[str], bound: float, t0: float
    ) -> int:
        """Wait for ``proc`` until ``bound`` s after ``t0``; past it kill its group: a hang.
        Its group must be gone within :data:`LINGER_S` of its exit: a process it left behind
        is a hang too."""
        try:
            rc = proc.wait(timeout=max(0.1, t0 + bound - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop_group(proc)
            raise CheckFailed(f"hang: ran past its {bound:.0f} s bound: {' '.join(argv)}") from None
        end = time.monotonic() + LINGER_S
        while group_alive(proc.pid):
            if time.monotonic() > end:
                stop_group(proc)
                raise CheckFailed(f"hang: left processes running {LINGER_S} s after it exited "
                                  f"(exit {rc}): {' '.join(argv)}")  # fmt: skip
            time.sleep(0.1)
        return rc

    def run(self, command: str, argv: list[str], log: str) -> tuple[int, float]:
        t0 = time.monotonic()
        rc = self.finish(self.start(argv, log), argv, self.bound(command), t0)
        return rc, time.monotonic() - t0

    def kill_run(self, command: str, argv: list[str], log: str, point: tuple[str, float | str],
                 marker: Callable[[], bool] | None) -> str:  # fmt: skip
        """Run ``argv`` and SIGKILL its process group at ``point``; what happened, one line."""
        kind, value = point
        what = f"{float(value):.1f} s" if kind == "delay" else f"'{value}'"
        t0 = time.monotonic()
        proc = self.start(argv, log)
        deadline = t0 + self.bound(command)
        while proc.poll() is None and time.monotonic() < deadline:
            now = time.monotonic() - t0
            if (kind == "delay" and now >= float(value)) or (marker is not None and marker()):
                os.killpg(proc.pid, signal.SIGKILL)
                self.finish(proc, argv, LINGER_S, time.monotonic())  # the whole group is gone
                return f"{kind} {what}: killed at {now:.1f} s"
            time.sleep(0.05 if kind == "delay" else 0.1)
        if proc.poll() is None:
            self.finish(proc, argv, self.bound(command), t0)  # raises the hang
        return f"{kind} {what}: ended (exit {proc.returncode}) before the kill"

    def last_error(self, log: str) -> str:
        lines = (self.work / "logs" / f"{log}.log").read_text(errors="replace").splitlines()
        wanted = [ln for ln in lines if "error" in ln.lower() or "Error" in ln]
        return " ".join((wanted or lines or ["(no output)"])[-1].split())[:240]

    # ------------------------------------------------------------------ commands

    def argv(self, command: str, out: str, rng: random.Random | None) -> list[str]:
        ray = rng is not None and not self.quick and rng.random() < 0.5
        address = ["--address", self.world.address]
        train = ["--data", self.data, "--storage", str(self.work / "runs"), "--name", out,
                 "--workers", "1", "--cpus-per-worker", "1", "--batch-size", "8",
                 "--loader-workers", "0", "--epochs", str(self.epochs), "--steps-per-epoch", "3",
                 "--arch", "resnet-small", "--trace-dir", str(self.trace(out)), *address]  # fmt: skip
        if command == "shard":
            where = address if ray else ["--workers", "0"]
            return [*PY, "shard", "--no-progress", str(self.work / "slides"), "--out", out,
                    "--labels", str(self.work / "slides" / "labels.csv"), "--mags", "10,5",
                    "--tile-px", "64", "--shard-size", "100KB", *where]  # fmt: skip
        if command == "teacher":
            return [*PY, "teacher", *train]
        if command == "distill":
            return [*PY, "distill", *train, "--teacher", str(self.teacher), "--student-mag",
                    "5x", "--no-teacher-eval"]  # fmt: skip
        if command == "teacher-targets":
            where = address if ray else ["--local"]
            return [*PY, "teacher-targets", "--data", self.data, "--teacher", str(self.teacher),
                    "--out", out, *where]  # fmt: skip
        slides = [f"s3://{BUCKET}/slides/{name}" for name in self.slides]
        return [*PY, "predict", str(self.teacher), *slides, "--out", out, "--heatmap", "none",
                "--actors", "1", *address]  # fmt: skip

    @property
    def slides(self) -> list[str]:
        """The slide files ``predict`` classifies (from S3, through the proxy)."""
        found = sorted(p.name for p in (self.work / "slides").iterdir() if p.suffix in (".svs", ".tiff"))  # fmt: skip
        return found[: 2 if self.quick else None]

    def upload_slides(self) -> None:
        from sharding.storage import open_storage

        store = open_storage(f"s3://{BUCKET}/slides")
        for name in self.slides:
            store.put_file(name, self.work / "slides" / name)

    def trace(self, run: str) -> Path:
        """The ``--trace-dir`` of training run ``run``: its workers' starts (``starts.jsonl``)."""
        return self.work / "traces" / run

    @property
    def epochs(self) -> int:
        return 2 if self.quick else 3

    @property
    def data(self) -> str:
        return f"s3://{BUCKET}/data"

    def output(self, command: str, tag: str) -> str:
        """Where ``command`` writes in round ``tag``: an S3 URL, a local folder or a run name."""
        if command in ("shard", "teacher-targets"):
            return self.data if (command, tag) == ("shard", "clean") else f"s3://{BUCKET}/{tag}/{command}"  # fmt: skip
        if command == "predict":
            return str(self.work / tag / "predict")
        return f"{command}-{tag}"

    def marker(self, command: str, out: str, name: str) -> Callable[[], bool]:
        from sharding.lease import LEASE
        from sharding.storage import open_storage

        if command in ("teacher", "distill"):
            folder = self.work / "runs" / out
            if name == "first checkpoint":  # its folder appears: being written
                return lambda: any(folder.glob("checkpoint_epoch*"))
            if name == "first checkpoint kept":  # Ray Train recorded it: a rerun resumes from it
                return lambda: (folder / "checkpoint_manager_snapshot.json").exists()
            return lambda: (folder / LEASE).exists()
        store = open_storage(out)  # S3 straight to moto: polling spends no fault
        tests = {
            "lease taken": lambda: store.exists(LEASE),
            "first slide planned": lambda: bool(store.list("_state/slides/")),
            "first shard published": lambda: any(n.endswith(".tar") for n in store.list()),
            "first targets file": lambda: any(n.endswith(".npz") for n in store.list()),
            "first slide written": lambda: any(Path(out).glob("*.json")),
        }
        return tests[name]

    def check(self, command: str, out: str) -> str:
        from sharding.lease import LEASE
        from sharding.storage import open_storage

        clean = self.output(command, "clean")
        training = command in ("teacher", "distill")
        where = str(self.work / "runs" / out) if training else out
        if open_storage(where).exists(LEASE):
            raise CheckFailed(f"{where}: the rerun ended and left its lease {LEASE}")
        if command == "shard":
            return check_dataset(out, clean)
        if training:
            starts = self.trace(out) / "starts.jsonl"
            n = len(starts.read_text().splitlines()) if starts.exists() else 0
            if n != 1:  # one Ray Train worker: a second start is a restart after a failure
                raise CheckFailed(f"the rerun's worker started {n} times: a failure (a broken S3 "
                                  f"read?) restarted it; see {starts}")  # fmt: skip
            log = (self.work / "logs" / f"{command}-{out.rsplit('-', 1)[1]}-rerun.log").read_text()
            resumed = re.search(r"resuming after epoch (\d+)", log)
            how = f"resumed after epoch {resumed.group(1)}" if resumed else "started over"
            ref = self.work / "runs" / clean
            return f"{how}; " + check_run(Path(where), self.epochs, ref if ref.is_dir() else None)
        if command == "teacher-targets":
            return check_targets(out, clean)
        return check_predictions(Path(out), Path(clean))

    # ------------------------------------------------------------------ rounds

    def clean(self, command: str) -> bool:
        """The uninterrupted reference run of ``command``, no faults armed; True if it ran."""
        if command in self.clean_s:
            return True
        assert self.world.proxy is not None
        self.world.proxy.arm("reset", 0, 0)
        out = self.output(command, "clean")
        argv = self.argv(command, out, None)
        row = Row(command, "clean", kill="none (reference)")
        try:
            row.rerun_rc, row.seconds = self.run(command, argv, f"{command}-clean")
            row.ok = row.rerun_rc == 0
            row.check = "reference" if row.ok else f"exit {row.rerun_rc}: {self.last_error(f'{command}-clean')}"  # fmt: skip
        except CheckFailed as exc:
            row.check = str(exc)
        self.report(row)
        if row.ok:
            self.clean_s[command] = row.seconds
            if command == "teacher":
                self.teacher = str(self.work / "runs" / out / f"checkpoint_epoch{self.epochs:04d}")
        return row.ok

    def chaos(self, command: str, rnd: int) -> None:
        tag = f"r{rnd}"
        rng = random.Random(f"{self.seed}/{rnd}/{command}")
        out = self.output(command, tag)
        argv = self.argv(command, out, rng)
        clean_s = self.clean_s.get(command)
        if clean_s is not None and rng.random() < 0.5:
            point: tuple[str, float | str] = ("delay", rng.uniform(0.1, 0.9) * clean_s)
        else:
            point = ("marker", rng.choice(MARKERS[command]))
        row = Row(command, tag)
        proxy = self.world.proxy
        assert proxy is not None
        try:
            self.arm(rng)
            marker = self.marker(command, out, str(point[1])) if point[0] == "marker" else None
            row.kill = self.kill_run(command, argv, f"{command}-{tag}-killed", point, marker)
            row.faults = proxy.faults
            shutil.rmtree(self.trace(out), ignore_errors=True)  # the rerun's worker starts only
            self.arm(rng)
            row.rerun_rc, row.seconds = self.run(command, argv, f"{command}-{tag}-rerun")
            row.faults += proxy.faults
            if row.rerun_rc != 0:
                raise CheckFailed(f"rerun exit {row.rerun_rc}: {self.last_error(f'{command}-{tag}-rerun')}")  # fmt: skip
            row.check, row.ok = self.check(command, out), True
        except CheckFailed as exc:
            row.check = str(exc)
        self.report(row)
        if row.ok and command == "teacher" and self.teacher is None:
            self.teacher = str(self.work / "runs" / out / f"checkpoint_epoch{self.epochs:04d}")

    def arm(self, rng: random.Random) -> None:
        assert self.world.proxy is not None
        mode = rng.choice(["reset", "stall"])
        # up to 4 faults: what a read of one object survives (sharding.storage.s3_read), and
        # more than the 2 worker restarts (--max-failures) that used to absorb a broken read
        self.world.proxy.arm(mode, rng.randrange(16_000, 200_000), rng.randint(2, 4))  # type: ignore[arg-type]

    def report(self, row: Row) -> None:
        self.rows.append(row)
        state = "ok" if row.ok else "FAILED"
        print(f"[chaos] {row.command} {row.round}: {row.kill}; exit {row.rerun_rc} in "
              f"{row.seconds:.1f} s; {row.faults} S3 fault(s); {state}: {row.check}",
              file=sys.stderr, flush=True)  # fmt: skip


def table(rows: list[Row]) -> str:
    head = ("command", "round", "kill point", "exit", "seconds", "faults", "check")
    cells = [head] + [(r.command, r.round, r.kill, str(r.rerun_rc), f"{r.seconds:.1f}",
                       str(r.faults), ("ok: " if r.ok else "FAILED: ") + r.check) for r in rows]  # fmt: skip
    widths = [max(len(c[i]) for c in cells) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join(c[i].ljust(widths[i]) for i in range(len(widths))) + "  " + c[-1] for c in cells
    )


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     epilog=doc.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="the small run the tests use")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of kills, one per "
                        "command each (default: 1 with --quick, else 2: 10 kills)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of kill points and faults")
    parser.add_argument("--only", default=",".join(COMMANDS), metavar="CMD,...",
                        help="comma list of commands (default: all five)")  # fmt: skip
    parser.add_argument(
        "--bound-scale",
        type=float,
        default=1.0,
        help="multiply every command's time bound (a slow machine)",
    )
    parser.add_argument("--workdir", default=None, help="working folder (default: a new temp "
                        "folder, removed unless a check failed)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    args = parser.parse_args(argv)
    only = [c for c in COMMANDS if c in args.only.split(",")]
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="chaos-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"[chaos] working in {work}", file=sys.stderr, flush=True)
    started = time.monotonic()
    with World(work, ray_cpus=max(2, os.cpu_count() or 2)) as world:
        chaos = Chaos(world, work, args.quick, args.seed, args.bound_scale)
        synth = [*PY, "synth", str(work / "slides"), "--slides", "4" if args.quick else "6",
                 "--size-um", "700x600" if args.quick else "900x700", "--seed", "3"]  # fmt: skip
        rc, _ = chaos.run("synth", synth, "synth")
        if rc == 0:
            chaos.upload_slides()
        if rc != 0 or not chaos.clean("shard"):
            print(f"[chaos] could not set up: see {work / 'logs'}", file=sys.stderr)
            return 1
        needs_clean = {"shard", "teacher-targets", "predict"} | (set() if args.quick else {"teacher", "distill"})  # fmt: skip
        for rnd in range(1, rounds + 1):
            for command in only:
                if command in ("teacher", "distill") and not args.quick:
                    chaos.clean("teacher")
                if command in ("teacher-targets", "distill", "predict") and chaos.teacher is None:
                    chaos.report(Row(command, f"r{rnd}", check="skipped: no teacher checkpoint"))
                    continue
                if command in needs_clean and not chaos.clean(command):
                    continue
                chaos.chaos(command, rnd)
    failed = [r for r in chaos.rows if not r.ok]
    kills = sum(1 for r in chaos.rows if r.round != "clean")
    print(table(chaos.rows))
    faults = sum(r.faults for r in chaos.rows)
    print(f"{kills} kill(s), {len(failed)} failure(s), {faults} S3 fault(s) injected, "
          f"seed {args.seed}, {time.monotonic() - started:.0f} s")  # fmt: skip
    if failed or args.keep:
        print(f"[chaos] outputs and logs kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
