"""Sharding throughput against a naive tiler, and peak memory against slide size.

Baseline (how CLAM- and histolab-style tilers cut multi-magnification tiles): for every region
and every magnification, ``read_region`` at level 0, convert, resize to the tile size, encode,
and append to a tar. resdistill reads each region once from the best pyramid level and reduces
it for the lower magnifications. Both cut the same regions (the same planner) into the same
samples, in one process on one core, so the ratio measures the reading strategy alone; a second
line gives resdistill on local Ray with every core.

Peak memory: ``resdistill shard`` (in-process) on a slide and on one 16x larger in area, each in
a fresh subprocess; the ratio of peak RSS should stay near 1 because regions are streamed.

Codec bound (:func:`codec_bound`): the least work any sharder of these samples must do with
the same codecs: decode each region once from the pyramid level ``run_shard`` reads (OpenSlide
``read_region`` + PIL's conversion to RGB, without the alpha check ``run_shard`` adds) and encode
its output tiles with ``run_shard``'s own encoder (:func:`sharding.codec.encode`), nothing else:
no thumbnail, tissue detection, QC picture, resampling, statistics, tar, manifest or writes. :func:`shard_rows` reports ``run_shard`` against it with the split of
``run_shard``'s time by phase, measured in a separate run (:mod:`shard_phases`).

    python benchmarks/bench_shard.py            # prints the table; --json PATH writes the numbers
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_rows import row  # noqa: E402
from shard_phases import phase_clock, split_note  # noqa: E402

from sharding.codec import encode  # noqa: E402
from sharding.extract import SlideJob, plan_slide  # noqa: E402
from sharding.options import ShardOptions  # noqa: E402
from sharding.pipeline import run_shard  # noqa: E402
from sharding.slide import downsample, open_slide, read_level, slide_info  # noqa: E402
from sharding.synthetic import write_synthetic_slides  # noqa: E402

MAGS = "10,5,2.5,1.25"
TILE_PX = 224


def naive_shard(slides: list[Path], out: Path, opts: ShardOptions) -> int:
    """The baseline: level-0 read + resize per tile and per magnification."""
    import openslide
    from PIL import Image

    n = 0
    with tarfile.open(out, "w") as tar:
        for path in slides:
            plan = plan_slide(SlideJob(str(path), path.stem, "train", None, None), opts)
            slide = openslide.OpenSlide(str(path))
            for x, y in zip(plan.xs.tolist(), plan.ys.tolist(), strict=True):
                for mag in opts.mags:
                    region = slide.read_region((x, y), 0, (plan.size0, plan.size0)).convert("RGB")
                    px = opts.sizes[mag.name]
                    tile = region.resize((px, px), Image.Resampling.LANCZOS)
                    buf = io.BytesIO()
                    tile.save(buf, format="JPEG", quality=opts.quality)
                    info = tarfile.TarInfo(f"{path.stem}_{x}_{y}.{mag.name}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
                n += 1
            slide.close()
    return n


def codec_bound(slides: list[Path], opts: ShardOptions) -> tuple[float, float]:
    """Seconds to decode every region ``run_shard`` cuts and to encode its tiles (see the module
    docstring): ``(decode_s, encode_s)``. The tiles encoded are the ones ``run_shard`` makes
    (the top magnification reduced, made untimed); the decode is OpenSlide's ``read_region`` and
    PIL's ``convert("RGB")``, no cheaper than ``run_shard``'s (which also checks alpha)."""
    decode_s = encode_s = 0.0
    top = opts.sizes[opts.mags[0].name]
    for path in slides:
        plan = plan_slide(SlideJob(str(path), path.stem, "train", None, None), opts)
        slide = open_slide(str(path))
        info = slide_info(slide, str(path), plan.base_mpp)
        level, read_px = read_level(info, plan.size0, top)
        for x, y in zip(plan.xs.tolist(), plan.ys.tolist(), strict=True):
            t0 = time.perf_counter()
            region = slide.read_region((x, y), level, (read_px, read_px)).convert("RGB")
            decode_s += time.perf_counter() - t0
            region = downsample(region, top)
            tiles = [downsample(region, opts.sizes[m.name]) for m in opts.mags]
            t0 = time.perf_counter()
            for tile in tiles:
                encode(tile, opts)
            encode_s += time.perf_counter() - t0
        slide.close()
    return decode_s, encode_s


def shard_rows(
    slides: Path, work: Path, *, mags: str, tile_px: int, row: Callable[..., dict], repeats: int = 3
) -> list[dict]:
    """Two rows on the slides in folder ``slides``, one core, no Ray: the naive tiler vs
    ``run_shard`` (samples/s), and the codec bound vs ``run_shard`` (``codec / ours``, 1.0: all
    of ``run_shard``'s time is codec work), whose note gives ``run_shard``'s time by phase.

    ``run_shard`` and the bound are each timed ``repeats`` times, in turn, best kept (the machine
    is shared: the best is the least disturbed), ``run_shard`` into a fresh folder each time; the
    naive tiler, many times slower, once.
    """
    files = sorted(p for p in slides.iterdir() if p.suffix in (".svs", ".tiff"))
    work.mkdir(parents=True, exist_ok=True)
    opts = ShardOptions.make(mags, tile_px)

    def ours() -> tuple[int, float]:
        out = work / "ours"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        rep = run_shard(
            files, str(out), mags=mags, tile_px=tile_px, workers=0, progress=False
        )  # fmt: skip
        return rep.new_samples, time.perf_counter() - t0

    t0 = time.perf_counter()
    n_naive = naive_shard(files, work / "naive.tar", opts)
    naive_s = time.perf_counter() - t0
    runs, bounds = [], []
    for _ in range(repeats):  # interleaved, so that both see the same load
        runs.append(ours())
        bounds.append(codec_bound(files, opts))
    n, ours_s = min(runs, key=lambda r: r[1])
    if n != n_naive:
        raise RuntimeError(f"run_shard cut {n} samples, the naive tiler {n_naive}: not comparable")
    decode_s, encode_s = min(bounds, key=sum)
    codec_s = decode_s + encode_s
    with phase_clock() as clock:  # a run of its own: the wrappers cost a little
        _, split_s = ours()
    split = split_note(clock.seconds, split_s)
    return [
        row("shard: resdistill vs naive read_region loop (1 core)", "naive", n_naive / naive_s,
            "run_shard", n / ours_s, "samples/s", (n / ours_s) / (n_naive / naive_s), ">= 4x",
            f"{n} samples x {len(opts.mags)} mags"),
        row("shard: codec bound vs resdistill (1 core)", "decode+encode only", n / codec_s,
            "run_shard", n / ours_s, "samples/s", codec_s / ours_s, "<= 1, -> 1.0",
            f"decode {decode_s:.2f}s + encode {encode_s:.2f}s vs {ours_s:.2f}s; run_shard: "
            f"{split}"),
    ]  # fmt: skip


def peak_rss_mb(slide: Path, out: Path) -> float:
    """Peak RSS of a fresh process sharding ``slide`` in-process."""
    code = (
        "import resource, sys; from sharding.pipeline import run_shard; "
        f"run_shard([{str(slide)!r}], {str(out)!r}, mags={MAGS!r}, workers=0, progress=False); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return int(res.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--size-um", type=float, nargs=2, default=(3000.0, 2400.0))
    ap.add_argument("--work", default=None, help="working folder (default: a temp folder)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-shard-"))
    slides_dir = work / "slides"
    if not any(slides_dir.glob("*.svs")):
        write_synthetic_slides(slides_dir, args.slides, seed=1, size_um=tuple(args.size_um))
    slides = sorted(p for p in slides_dir.iterdir() if p.suffix in (".svs", ".tiff"))
    results: dict = {
        "slides": len(slides),
        "size_um": list(args.size_um),
        "mags": MAGS,
        "tile_px": TILE_PX,
    }

    naive, codec = shard_rows(slides_dir, work / "one-core", mags=MAGS, tile_px=TILE_PX, row=row)
    n = int(naive["note"].split()[0])
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False
    )  # not timed
    t = time.perf_counter()
    rep_ray = run_shard(slides, str(work / "ours-ray"), mags=MAGS, progress=False, overwrite=True)
    ray_s = time.perf_counter() - t
    ray.shutdown()
    results.update(
        tiles=n,
        naive_tiles_per_s=naive["baseline_value"],
        ours_tiles_per_s=naive["ours_value"],
        codec_bound_tiles_per_s=codec["baseline_value"],
        codec_ratio=codec["ratio"],
        codec_note=codec["note"],
        ours_ray_tiles_per_s=rep_ray.new_samples / ray_s,
        ray_cores=os.cpu_count(),
    )
    results["speedup_1core"] = results["ours_tiles_per_s"] / results["naive_tiles_per_s"]
    results["speedup_ray"] = results["ours_ray_tiles_per_s"] / results["naive_tiles_per_s"]

    if not args.skip_memory:
        mem_dir = work / "mem"
        w, h = args.size_um
        w, h = w / 2, h / 2  # the 16x larger slide is then 4 * (w, h) / 2 per side
        small = write_synthetic_slides(mem_dir / "small", 1, seed=2, size_um=(w, h))[0].path
        large = write_synthetic_slides(mem_dir / "large", 1, seed=2, size_um=(4 * w, 4 * h))[0].path
        results["peak_rss_mb_small"] = peak_rss_mb(small, mem_dir / "out-small")
        results["peak_rss_mb_16x"] = peak_rss_mb(large, mem_dir / "out-large")
        results["memory_ratio_16x"] = results["peak_rss_mb_16x"] / results["peak_rss_mb_small"]

    print(
        f"sharding {results['tiles']} samples ({MAGS} at {TILE_PX}px) from {len(slides)} synthetic slides"
    )
    print(f"  naive read_region loop, 1 core : {results['naive_tiles_per_s']:8.1f} samples/s")
    print(
        f"  resdistill shard, 1 core       : {results['ours_tiles_per_s']:8.1f} samples/s  "
        f"ratio {results['speedup_1core']:.1f}x (target >= 4x)"
    )
    print(
        f"  codec bound, 1 core            : {results['codec_bound_tiles_per_s']:8.1f} samples/s  "
        f"codec / ours {results['codec_ratio']:.2f} (-> 1.0)\n    {results['codec_note']}"
    )
    print(
        f"  resdistill shard, Ray {results['ray_cores']} cores   : {results['ours_ray_tiles_per_s']:8.1f} samples/s  "
        f"ratio {results['speedup_ray']:.1f}x"
    )
    if "memory_ratio_16x" in results:
        print(
            f"  peak RSS: slide {results['peak_rss_mb_small']:.0f} MB, 16x larger slide "
            f"{results['peak_rss_mb_16x']:.0f} MB, ratio {results['memory_ratio_16x']:.2f} (target <= 1.25)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
