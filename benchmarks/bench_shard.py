"""Sharding throughput against a naive tiler, and peak memory against slide size.

Baseline (how CLAM- and histolab-style tilers cut multi-magnification tiles): for every region
and every magnification, ``read_region`` at level 0, convert, resize to the tile size, encode,
and append to a tar. resdistill reads each region once from the best pyramid level and reduces
it for the lower magnifications. Both cut the same regions (the same planner) into the same
samples, in one process on one core, so the ratio measures the reading strategy alone; a second
line gives resdistill on local Ray with every core.

Peak memory: ``resdistill shard`` (in-process) on a slide and on one 16x larger in area, each in
a fresh subprocess; the ratio of peak RSS should stay near 1 because regions are streamed.

    python benchmarks/bench_shard.py            # prints the table; --json PATH writes the numbers
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sharding.extract import SlideJob, plan_slide  # noqa: E402
from sharding.options import ShardOptions  # noqa: E402
from sharding.pipeline import run_shard  # noqa: E402
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
    opts = ShardOptions.make(MAGS, TILE_PX)
    results: dict = {
        "slides": len(slides),
        "size_um": list(args.size_um),
        "mags": MAGS,
        "tile_px": TILE_PX,
    }

    t = time.perf_counter()
    n_naive = naive_shard(slides, work / "naive.tar", opts)
    naive_s = time.perf_counter() - t
    t = time.perf_counter()
    rep = run_shard(
        slides, str(work / "ours-1"), mags=MAGS, workers=0, progress=False, overwrite=True
    )
    ours_s = time.perf_counter() - t
    assert rep.new_samples == n_naive, (rep.new_samples, n_naive)
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
        tiles=n_naive,
        naive_tiles_per_s=n_naive / naive_s,
        ours_tiles_per_s=n_naive / ours_s,
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
