"""Remote slides: ``resdistill predict`` on ``s3://`` slides by byte ranges vs whole copies.

The same slides (synthetic 40x SVS/TIFF with JPEG tiles, :func:`bench_predict_scale.linked_slides`)
on a local S3 endpoint (``moto_server`` on 127.0.0.1), predicted by the same model with
``--s3-reads copy`` (each slide copied whole into the node's slide cache, then read) and
``--s3-reads ranges`` (:mod:`sharding.slide_ranges`: only the bytes OpenSlide reads), each from
an empty cache. Reported: slides/hour, and the bytes fetched (what the cache entries hold: whole
files for ``copy``, the recorded ranges for ``ranges``) against the slides' total size. On
loopback a byte costs almost nothing to fetch; over a network the bytes are the cost.

    python benchmarks/bench_remote.py --work W [--slides 4] [--mag 2p5x]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cache_bytes(cache: Path) -> dict[str, int]:
    """Bytes fetched into the slide cache: ``copy`` (whole entries) and ``ranges`` (the ranges
    their ``.present`` records hold)."""
    out = {"copy": 0, "ranges": 0}
    for entry in cache.iterdir() if cache.exists() else ():
        if entry.name.startswith("."):
            continue
        if entry.name.endswith("-ranges"):
            spans = json.loads((entry / ".present").read_text())
            out["ranges"] += sum(b - a for a, b in spans)
        else:
            out["copy"] += sum(f.stat().st_size for f in entry.iterdir() if f.name != "source.json")
    return out


def remote_rows(
    ckpt: str, slides: list[Path], work: Path, *, row: Any, log: Any = print
) -> list[dict[str, Any]]:
    """The rows of the module docstring; needs an S3 endpoint in the environment and Ray not
    started (its workers take the slide cache folder from this process's environment)."""
    import ray
    from student_runs import metered_run, warm_up

    from sharding.ray_cluster import ray_init
    from sharding.remote_slides import CACHE_ENV
    from sharding.storage import open_storage, s3_client

    if ray.is_initialized():
        ray.shutdown()  # its workers must start with this cache folder in their environment
    cache = work / "slide-cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ[CACHE_ENV] = str(cache)
    s3_client().create_bucket(Bucket="bench-slides")
    store = open_storage("s3://bench-slides/cohort")
    for p in slides:
        store.put_file(p.name, p)
    urls = [store.child_url(p.name) for p in slides]
    total = sum(p.stat().st_size for p in slides)
    ray_init(None, dashboard=False)
    warm_up(ckpt, slides, work / "remote-warm")
    got: dict[str, dict[str, Any]] = {}
    for how in ("copy", "ranges"):
        shutil.rmtree(cache, ignore_errors=True)
        r = metered_run(ckpt, urls, work / f"remote-{how}", "--read", "native", "--s3-reads", how)
        r["bytes"] = cache_bytes(cache)[how]
        got[how] = r
        log(f"  {how}: {r['wall_s']:.1f}s, {r['bytes'] / 1e6:.1f} MB fetched of {total / 1e6:.1f}")
    c, g = got["copy"], got["ranges"]
    note = (
        f"{len(slides)} slides of {total / len(slides) / 1e6:.0f} MB, moto on 127.0.0.1; bytes "
        f"fetched: copy {c['bytes'] / 1e6:.1f} MB, ranges {g['bytes'] / 1e6:.1f} MB "
        f"({g['bytes'] / max(1, c['bytes']):.1%}); {c['wall_s']:.1f}s vs {g['wall_s']:.1f}s; "
        f"CPU seconds (the moto server's included) {c['cpu_s']:.0f} vs {g['cpu_s']:.0f}"
    )
    return [row(
        "remote s3:// slides: --s3-reads ranges vs copy", "copy", c["slides_per_hour"], "ranges",
        g["slides_per_hour"], "slides/h", g["slides_per_hour"] / c["slides_per_hour"], "", note,
    )]  # fmt: skip


def run_all_rows(work: Path, *, quick: bool, row: Any) -> list[dict[str, Any]]:
    """``run_all.py``'s [remote] section: the 2.5x student on 4 (quick: 2) linked synthetic 40x
    slides of 8 x 6 mm (quick: 4 x 3 mm) on a moto endpoint of its own; Ray is shut down after."""
    import ray
    from bench_loader import moto_endpoint
    from student_runs import run_all_student

    ckpt, slides = run_all_student(work, quick=quick)
    with moto_endpoint(work):
        try:
            return remote_rows(ckpt, slides, work, row=row)
        finally:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    from bench_loader import moto_endpoint
    from bench_rows import row
    from student_runs import print_rows, student_on_slides, student_parser

    args = student_parser(__doc__ or "", slides=4).parse_args(argv)
    work = Path(args.work)
    ckpt, slides = student_on_slides(work, args.slides, args.size_um, args.mag)
    with moto_endpoint(work):
        rows = remote_rows(ckpt, slides, work, row=row)
        import ray

        ray.shutdown()
    print_rows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
