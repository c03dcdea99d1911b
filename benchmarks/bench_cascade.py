"""Seconds of the cascade against the teacher and the student alone, through ``resdistill predict``.

    python benchmarks/bench_cascade.py --demo demo      # a finished `resdistill demo --out demo`

Predicts the demo's test slides (``--heatmap none``) with the label-scarce pair of the demo
(``teacher-10pct`` and ``distilled-10pct``, best checkpoints as ``eval/demo.json`` lists them):
the teacher alone, the student alone, and the cascade at ``--escalate`` (default 0.75), each
``--repeats`` times (default 2) in turn, on one local Ray session after one warm-up run; prints
the wall seconds of each. The accuracy and counted FLOPs of each threshold come from
``resdistill evaluate STUDENT --cascade TEACHER`` on the same split.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv: list[str] | None = None) -> int:
    from bench_predict import engine_run
    from bench_serve import demo_models, demo_test_slides

    from sharding.ray_cluster import ray_init

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--demo", required=True, help="folder of a finished `resdistill demo`")
    ap.add_argument("--escalate", type=float, default=0.75, help="cascade threshold")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each (default: 2)")
    args = ap.parse_args(argv)
    demo = Path(args.demo).resolve()
    models = demo_models(demo)
    student, teacher = models["distilled-10pct"], models["teacher-10pct"]
    slides, _ = demo_test_slides(demo)
    runs = {
        "teacher": (teacher,),
        "student": (student,),
        "cascade": (student, "--cascade", teacher, "--escalate", str(args.escalate)),
    }
    ray_init(None, dashboard=False)
    out = Path(tempfile.mkdtemp(prefix="rdcascade-"))
    try:
        engine_run(student, slides, out / "warm-up", "--heatmap", "none")
        seconds: dict[str, list[float]] = {k: [] for k in runs}
        for rep in range(args.repeats):
            for name, (ckpt, *extra) in runs.items():
                got = engine_run(ckpt, slides, out / f"{name}-{rep}", "--heatmap", "none", *extra)
                seconds[name].append(round(got["wall_s"], 2))
    finally:
        shutil.rmtree(out, ignore_errors=True)
        import ray

        ray.shutdown()
    print(f"{len(slides)} test slides, wall seconds per run:", json.dumps(seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
