"""Peer row: the same checkpoint on the same slides through the loop users write themselves.

TIAToolbox's and slideflow's documentation teach whole-slide inference as a tissue mask from an
Otsu threshold on a low-resolution thumbnail, a grid of tiles over it, and a
``torch.utils.data.Dataset`` whose workers open the slide with OpenSlide, ``read_region`` each
tile from the pyramid level nearest the model's magnification, convert it to RGB, resize it and
normalise it, batched by a ``DataLoader`` into the model under ``torch.no_grad()``.
:func:`peer_run` is that loop (one DataLoader worker per core, the model in the main process);
:func:`peer_rows` runs it and ``resdistill predict`` (Ray Data, ``--read native``, heatmaps
written) on the same slides with the same checkpoint, each under :class:`PeakMemory`, and
reports slides/hour and peak memory side by side.

TIAToolbox itself (``PatchPredictor``) is tried with ``--tiatoolbox`` in a virtual environment of
its own (:func:`tiatoolbox_python`, never a dependency of the project); its row is skipped with a
note saying why (on the development machine pip did not resolve it against the project's torch
within the time allowed, and unpinned it fetches a CUDA torch of its own).

    python benchmarks/bench_peer.py --work W [--slides 8] [--mag 2p5x]
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


class PeakMemory:
    """Peak resident memory (bytes) of this process and all its descendants (Ray's raylet and
    workers, DataLoader workers), sampled every ``every`` seconds: a sum of RSS, so pages shared
    between processes count once per process (an upper bound, the same for both runs)."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def _sample(self) -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def otsu(gray: np.ndarray) -> float:
    """Otsu's threshold of uint8 ``gray`` (the between-class variance maximised)."""
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * np.arange(256))
    w1 = w0[-1] - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 - m0 * w0[-1]) ** 2 / (w0 * w1)
    return float(np.nanargmax(between))


def peer_tiles(path: str, mpp: float, tile_px: int) -> list[tuple[str, int, int, int, int]]:
    """``(path, x, y, level, read_px)`` of the slide's tiles at ``mpp`` whose footprint is at
    least half tissue on an Otsu mask of a ~8 um/px thumbnail (the docs' recipe)."""
    import openslide

    with openslide.OpenSlide(path) as s:
        base = float(s.properties[openslide.PROPERTY_NAME_MPP_X])
        w, h = s.dimensions
        thumb = np.asarray(s.get_thumbnail((int(w * base / 8), int(h * base / 8))).convert("L"))
        mask = thumb < otsu(thumb)
        size0 = int(round(tile_px * mpp / base))
        level = s.get_best_level_for_downsample(size0 / tile_px)
        read_px = int(round(size0 / s.level_downsamples[level]))
    sy, sx = mask.shape[0] / h, mask.shape[1] / w
    out = []
    for y in range(0, h - size0 + 1, size0):
        for x in range(0, w - size0 + 1, size0):
            cell = mask[
                int(y * sy) : int((y + size0) * sy) + 1, int(x * sx) : int((x + size0) * sx) + 1
            ]
            if cell.size and cell.mean() >= 0.5:
                out.append((path, x, y, level, read_px))
    return out


class TileDataset:
    """``torch.utils.data.Dataset`` of tiles: each worker keeps its slides open."""

    def __init__(self, tiles: list, tile_px: int, mean: Any, std: Any) -> None:
        self.tiles, self.px, self.mean, self.std, self.open = tiles, tile_px, mean, std, {}

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> Any:
        import openslide
        import torch
        from PIL import Image

        path, x, y, level, read_px = self.tiles[i]
        if path not in self.open:
            self.open[path] = openslide.OpenSlide(path)
        img = self.open[path].read_region((x, y), level, (read_px, read_px)).convert("RGB")
        img = img.resize((self.px, self.px), Image.Resampling.BILINEAR)
        t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0
        return (t - self.mean) / self.std, i


def peer_run(ckpt: str, slides: list[Path], *, workers: int, batch: int) -> dict[str, Any]:
    """The docs' loop over ``slides`` (module docstring): wall seconds, tiles, slides/hour."""
    import torch

    from resdistill.checkpoint import load_model, normalization_of
    from sharding.magnification import Magnification

    t0 = time.perf_counter()
    model = load_model(ckpt)
    net = model.model.eval()
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in normalization_of(model))
    tiles = [t for p in slides for t in peer_tiles(str(p), Magnification.parse(model.mag).mpp,
                                                   int(model.tile_px))]  # fmt: skip
    data = TileDataset(tiles, int(model.tile_px), mean, std)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=workers)
    probs = np.zeros((len(tiles), len(model.classes)), np.float32)
    with torch.no_grad():
        for x, idx in loader:
            logits, _ = net(x)
            probs[idx.numpy()] = torch.softmax(logits, 1).numpy()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tiles": len(tiles), "slides_per_hour": 3600.0 * len(slides) / wall}


def tiatoolbox_python(venv: Path, timeout: float = 900) -> tuple[Path | None, str]:
    """The Python of a venv at ``venv`` where ``tiatoolbox`` imports, or None and why not. It is
    installed there with pip next to the project's own torch (a ``.pth`` file and a pin on its
    version: unpinned, pip fetches a CUDA build of torch of its own, gigabytes), within
    ``timeout`` seconds."""
    import torch

    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = next((venv / "lib").glob("python*/site-packages"))
        project = next(Path(sys.prefix, "lib").glob("python*/site-packages"))
        (site / "zz_project.pth").write_text(f"{project}\n")
        pin = f"torch=={torch.__version__.split('+')[0]}"
        try:
            got = subprocess.run([str(py), "-m", "pip", "install", "-q", "tiatoolbox", pin],
                                 capture_output=True, text=True, timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return None, f"pip install tiatoolbox {pin} did not finish in {timeout:.0f}s"
        if got.returncode:
            last = (got.stderr.strip().splitlines() or ["?"])[-1]
            return None, f"pip install tiatoolbox {pin} failed: {last}"
    ok = subprocess.run([str(py), "-c", "import tiatoolbox.models"], capture_output=True, text=True)
    if ok.returncode:
        return None, f"tiatoolbox does not import: {(ok.stderr.strip().splitlines() or ['?'])[-1]}"
    return py, ""


def peer_rows(
    ckpt: str, slides: list[Path], work: Path, *, row: Any, workers: int, batch: int = 64
) -> list[dict[str, Any]]:
    """``resdistill predict`` vs the docs' loop on the same slides and checkpoint."""
    from bench_predict_scale import CpuMeter
    from student_runs import metered_run, warm_up

    from sharding.ray_cluster import ray_init

    ray_init(None, dashboard=False)
    warm_up(ckpt, slides, work / "peer-warm")
    with PeakMemory() as mem_ours:
        ours = metered_run(ckpt, slides, work / "peer-ours", "--read", "native")
    with PeakMemory() as mem_peer, CpuMeter() as cpu_peer:
        peer = peer_run(ckpt, slides, workers=workers, batch=batch)
    gb = 1024**3
    note = (
        f"{len(slides)} slides; tiles: resdistill {ours['tiles']}, loop {peer['tiles']} (its own "
        f"Otsu mask); CPU seconds: resdistill {ours['cpu_s']:.0f} (heatmaps and tables "
        f"written), loop {cpu_peer.cpu_s:.0f} (writes nothing); peak memory (RSS of the process "
        f"tree): resdistill {mem_ours.peak / gb:.2f} GB, loop {mem_peer.peak / gb:.2f} GB"
    )
    return [row(
        "peer: resdistill predict vs OpenSlide + DataLoader loop (docs' recipe), same checkpoint",
        "loop", peer["slides_per_hour"], "resdistill predict", ours["slides_per_hour"],
        "slides/h", ours["slides_per_hour"] / peer["slides_per_hour"], "", note,
    )]  # fmt: skip


def run_all_rows(work: Path, *, quick: bool, row: Any) -> list[dict[str, Any]]:
    """``run_all.py``'s [peer] section: the 2.5x student on 4 (quick: 2) linked synthetic 40x
    slides of 8 x 6 mm (quick: 4 x 3 mm), TIAToolbox's row noted when it cannot run."""
    import os

    from student_runs import run_all_student

    ckpt, slides = run_all_student(work, quick=quick)
    return peer_rows(ckpt, slides, work, row=row, workers=os.cpu_count() or 1)


def main(argv: list[str] | None = None) -> int:
    import os

    from bench_rows import row
    from student_runs import print_rows, student_on_slides, student_parser

    ap = student_parser(__doc__ or "", slides=8)
    ap.add_argument("--tiatoolbox", action="store_true",
                    help="also try TIAToolbox in a venv of its own (slow to install)")  # fmt: skip
    args = ap.parse_args(argv)
    work = Path(args.work)
    ckpt, slides = student_on_slides(work, args.slides, args.size_um, args.mag)
    print_rows(peer_rows(ckpt, slides, work, row=row, workers=os.cpu_count() or 1))
    py, why = tiatoolbox_python(work / "tiatoolbox-venv") if args.tiatoolbox else (None, "")
    if not args.tiatoolbox:
        why = "not tried: pass --tiatoolbox"
    elif py is not None:
        why = f"it imports in {py}, but its PatchPredictor run is not written yet"
    print(f"TIAToolbox PatchPredictor row: skipped ({why})")
    import ray

    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
