"""``resdistill demo``: the whole pipeline end to end on synthetic slides (resdistill.demo)."""

from __future__ import annotations

import sys

from resdistill.commands.generate import CommandSpec
from resdistill.demo import DemoConfig

SPEC = CommandSpec(
    name="demo",
    config=DemoConfig,
    summary="run the pipeline end to end on synthetic slides",
    description="""\
Synthetic slides, a local Ray and a local folder as storage. Each stage is the code the
individual commands run, and a rerun resumes: finished stages are skipped (slides, shards and
trained runs are kept under --out).

Stages:
  1. synth     synthetic slides (4 classes whose cues live at different scales)
  2. shard     every region at the teacher's and the student's magnification
  3. teacher   supervised, at the highest magnification
  4. baseline  the student architecture at the low magnification, trained on labels only
  5. distill   the student at the low magnification, taught by the frozen teacher, no labels
  6. cached    the teacher's outputs stored once (teacher-targets), and the same student
               distilled from them without running the teacher (--no-cached skips it)
  7. the teacher, baseline and distilled student again with labels on only --label-fraction of
     the training slides (the teacher and baseline see those labels, cycled for as many steps
     as the full-label runs take; distillation sees every slide, unlabelled, from cached
     targets of that teacher unless --no-cached)
  8. evaluate  all of them on the test split: one table, JSON and plots under OUT/eval

The resolved options are written to OUT/config.yaml.

exit codes: 0 done; 1 sharding failed; 2 unusable options or data.""",
    examples=(
        "resdistill demo",
        "resdistill demo --out demo-small --slides 8 --epochs 2 --student-epochs 2",
        "resdistill demo --address auto --no-cached",
    ),
)


def run(cfg: DemoConfig) -> int:
    """Run (or resume) the demo: 0 done, 1 sharding failed, 2 unusable options or data."""
    from resdistill.demo import run_demo
    from resdistill.errors import UsageError

    try:
        return 0 if run_demo(cfg) is not None else 1
    except (UsageError, FileNotFoundError, ValueError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
