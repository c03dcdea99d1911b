"""Loader throughput against the rate at which training consumes samples, and S3 against local.

Measured on this machine's cores, one thing at a time:

* loader: :func:`resdistill.data.make_loader` in training mode (shuffle buffer, paired
  augmentation, normalisation), ``--loader-workers`` DataLoader processes, samples/s once warm;
  at the high magnification alone (what the teacher reads) and high + low (what distillation
  reads), from a local folder and from an S3 endpoint (a ``moto_server`` on 127.0.0.1 unless
  ``AWS_ENDPOINT_URL`` and ``--s3-data`` point at one);
* training: samples/s of a teacher step (resnet18 forward + backward + Adam at the high
  magnification) and of a distillation step (frozen teacher forward at high + student forward +
  backward at low), torch using every core.

Ratios printed: loader / training (target >= 10: data never starves training) and local / S3
(target <= 1.3). Without ``--data`` the dataset is made here: synthetic slides sharded by
``sharding.pipeline.run_shard`` at 10x/2.5x, 224 px JPEG tiles, in a temporary folder.

    python benchmarks/bench_loader.py                 # prints the table; --json PATH saves it
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_dataset(work: Path, slides: int, mags: str) -> str:
    """Synthetic slides -> shards in ``work/dataset`` (small shards so workers can split them)."""
    from sharding.pipeline import run_shard
    from sharding.synthetic import LABELS_CSV, write_synthetic_slides

    slide_dir = work / "slides"
    write_synthetic_slides(slide_dir, slides, seed=0, size_um=(3000.0, 2400.0))
    out = work / "dataset"
    report = run_shard(
        [slide_dir], str(out), mags=mags, labels=slide_dir / LABELS_CSV, workers=0,
        shard_size="4MB", progress=False, splits=(1.0, 0.0, 0.0),
    )  # fmt: skip
    if not report.ok:
        raise SystemExit(f"sharding the benchmark dataset failed: {report}")
    return str(out)


@contextlib.contextmanager
def moto_endpoint(work: Path) -> Iterator[str]:
    """A moto_server on 127.0.0.1 with dummy credentials in this process's environment."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(sys.executable).with_name("moto_server")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
    with open(work / "moto.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("moto_server did not start") from None
                time.sleep(0.1)
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
            AWS_CONFIG_FILE=str(work / "aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(work / "aws-credentials"),
        )  # fmt: skip
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def upload(local: str, url: str) -> None:
    """Copy a dataset folder to ``url`` (bucket created when missing)."""
    from sharding.storage import open_storage, s3_client, split_s3_url

    bucket, _ = split_s3_url(url)
    with contextlib.suppress(Exception):
        s3_client().create_bucket(Bucket=bucket)
    src, dst = open_storage(local), open_storage(url)
    for rel in src.list():
        dst.put_file(rel, Path(src.url) / rel)


def loader_rate(url: str, mags: list[str], *, workers: int, batch: int, samples: int) -> float:
    """Samples/s of a warm training loader (first batch, which fills the buffer, not timed)."""
    from resdistill.data import DatasetInfo, PairedAugment, make_loader

    info = DatasetInfo.load(url)
    steps = max(2, samples // batch + 1)
    loader = make_loader(
        info, ["train"], mags, batch_size=batch, train=True, num_workers=workers,
        shuffle_buffer=256, augment=PairedAugment(), steps=steps,
    )  # fmt: skip
    it = loader.epoch()
    next(it)
    t0 = time.perf_counter()
    n = sum(len(b) for b in it)
    rate = n / (time.perf_counter() - t0)
    loader.close()
    return rate


def train_rates(px_high: int, px_low: int, *, batch: int, steps: int) -> tuple[float, float]:
    """Samples/s of a teacher step and of a distillation step (all cores)."""
    import torch

    from resdistill.models import build_model

    torch.set_num_threads(os.cpu_count() or 1)
    x_hi = torch.randn(batch, 3, px_high, px_high)
    x_lo = torch.randn(batch, 3, px_low, px_low)
    y = torch.randint(0, 2, (batch,))

    def timed(step) -> float:
        step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return batch * steps / (time.perf_counter() - t0)

    teacher = build_model("resnet18", 2)
    opt = torch.optim.Adam(teacher.parameters(), 1e-3)

    def teacher_step() -> None:
        logits, _ = teacher(x_hi)
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    frozen = build_model("resnet18", 2).eval()
    student = build_model("resnet18", 2)
    sopt = torch.optim.Adam(student.parameters(), 1e-3)

    def distill_step() -> None:
        with torch.no_grad():
            t_logits, t_feat = frozen(x_hi)
        s_logits, s_feat = student(x_lo)
        pooled = torch.nn.functional.adaptive_max_pool2d(t_feat, s_feat.shape[-2:])
        loss = torch.nn.functional.kl_div(
            s_logits.log_softmax(1), t_logits.softmax(1), reduction="batchmean"
        ) + torch.nn.functional.mse_loss(s_feat, pooled)
        sopt.zero_grad()
        loss.backward()
        sopt.step()

    return timed(teacher_step), timed(distill_step)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", help="local dataset folder (default: made here)")
    ap.add_argument("--s3-data", help="the same dataset on S3 (default: uploaded to a moto_server)")
    ap.add_argument("--slides", type=int, default=3, help="synthetic slides when making the data")
    ap.add_argument("--loader-workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--samples", type=int, default=600, help="samples timed per loader figure")
    ap.add_argument("--train-steps", type=int, default=3, help="steps timed per training figure")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for every figure")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from resdistill.data import DatasetInfo

    console = Console()
    with tempfile.TemporaryDirectory(prefix="rdbench-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        local = args.data or make_dataset(work, args.slides, "10,2.5")
        info = DatasetInfo.load(local)
        high, low = info.magnifications[0], info.magnifications[-1]
        s3 = args.s3_data
        if s3 is None:
            stack.enter_context(moto_endpoint(work))
            s3 = "s3://bench/dataset"
            upload(local, s3)
        kw = {"workers": args.loader_workers, "batch": args.batch, "samples": args.samples}
        configs = {
            "loader_high_local": (local, [high]),
            "loader_high_s3": (s3, [high]),
            "loader_pair_local": (local, [high, low]),
            "loader_pair_s3": (s3, [high, low]),
        }
        rows = dict.fromkeys(configs, 0.0)
        for _ in range(args.repeats):  # interleaved, best of N: the cores may be shared
            for name, (url, mags) in configs.items():
                rows[name] = max(rows[name], loader_rate(url, mags, **kw))
        teach, distill = 0.0, 0.0
        for _ in range(args.repeats):
            t, d = train_rates(
                info.tile_px[high], info.tile_px[low], batch=args.batch, steps=args.train_steps
            )
            teach, distill = max(teach, t), max(distill, d)
        rows["train_teacher"] = teach
        rows["train_distill"] = distill

    ratios = {
        "loader_high / teacher training": rows["loader_high_local"] / teach,
        "loader_pair / distill training": rows["loader_pair_local"] / distill,
        "local / s3 (high)": rows["loader_high_local"] / rows["loader_high_s3"],
        "local / s3 (pair)": rows["loader_pair_local"] / rows["loader_pair_s3"],
    }
    targets = {
        "loader_high / teacher training": ">= 10",
        "loader_pair / distill training": ">= 10",
        "local / s3 (high)": "<= 1.3",
        "local / s3 (pair)": "<= 1.3",
    }
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    table = Table(
        title=f"{os.cpu_count()} cores, load average {load}; {high} ({info.tile_px[high]} px) "
        f"+ {low} ({info.tile_px[low]} px), batch {args.batch}, {args.loader_workers} loader workers"
    )
    table.add_column("measure")
    table.add_column("samples/s", justify="right")
    for k, v in rows.items():
        table.add_row(k, f"{v:,.0f}")
    console.print(table)
    ratio_table = Table(title="ratios")
    ratio_table.add_column("ratio")
    ratio_table.add_column("value", justify="right")
    ratio_table.add_column("target")
    for k, v in ratios.items():
        ratio_table.add_row(k, f"{v:.2f}", targets[k])
    console.print(ratio_table)
    if args.json:
        doc = {"rates": rows, "ratios": ratios, "cores": os.cpu_count(), "loadavg": os.getloadavg()}
        Path(args.json).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
