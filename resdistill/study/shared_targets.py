"""Teacher targets computed once per teacher and read by every study cell it teaches.

One teacher cell teaches many runs: every unlabelled share of its label fraction and seed, and
(seed 0) its arm's tuning trials. Running it on every training batch of each, for every epoch,
costs at 10x -> 2.5x 16 student forward passes per step. :func:`share_targets` runs it once
over the training splits (:func:`resdistill.train.targets.write_targets`), which costs about one
epoch of it, and points every run it teaches at the stored outputs (``data.targets``): the same
loss at the student's cost alone (flips and rotations are applied to the stored maps, see
:mod:`resdistill.train.targets`).

Only runs the stored outputs can serve read them (:func:`can_share`): no colour or stain jitter
(the teacher saw the un-jittered tile), max-pooled feature maps on the student's last map (no
``--feature-grid``: the stored maps are pooled to that map's size), no attention term. The others,
a recipe with colour jitter for instance, run their teacher online, as does every run's label-free
validation (:mod:`resdistill.train.selection`). Targets live in ``<out>/targets/<teacher sha256
[:16]>`` and are kept for ``--resume``; distillation refuses targets of another teacher or
dataset (:class:`resdistill.train.targets.StaleTargetsError`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from resdistill.config import STAGE_DISTILL, TrainConfig

TARGETS_DIR = "targets"


def can_share(cfg: TrainConfig) -> bool:
    """Whether ``cfg`` can learn from stored teacher outputs (module doc)."""
    d, loss = cfg.data, cfg.loss
    return (cfg.stage == STAGE_DISTILL and cfg.teacher is not None and not d.targets
            and not any(float(v) for v in d.jitter or ()) and not any(d.hed_jitter)
            and loss.feature_resize == "maxpool" and loss.attention_weight == 0
            and not loss.feature_grid)  # fmt: skip


def share_targets(
    configs: dict[str, TrainConfig],
    out: Path,
    rebuild: Callable[[str, str], TrainConfig],
    address: str | None,
    console: Any,
) -> dict[str, TrainConfig]:
    """``configs`` with every run :func:`can_share` rebuilt on its teacher's stored targets
    (``rebuild(cell id, targets URL)``); each teacher's targets written once (kept when its
    ``targets.json`` is there already, from an earlier phase or run)."""
    from resdistill.train.targets import TARGETS_JSON, teacher_sha256, write_targets
    from resdistill.train.targets_config import TargetsConfig

    by_teacher: dict[tuple[str, str], list[str]] = defaultdict(list)
    for cid, cfg in configs.items():
        if can_share(cfg):
            assert cfg.teacher is not None
            by_teacher[(cfg.teacher.checkpoint, cfg.teacher.mag)].append(cid)
    out_configs = dict(configs)
    for (teacher, mag), ids in sorted(by_teacher.items()):
        root = out / TARGETS_DIR / teacher_sha256(teacher)[:16]
        if not (root / TARGETS_JSON).exists():
            first = configs[ids[0]]
            mags = tuple(sorted({configs[i].model.mag for i in ids}))
            console.print(f"teacher targets of {teacher} for {len(ids)} runs -> {root}")
            write_targets(TargetsConfig(
                data=first.data.url, teacher=teacher, out=str(root),
                splits=tuple(first.data.train_splits or ()), student_mags=mags,
                teacher_mag=mag, address=address,
            ))  # fmt: skip
        for cid in ids:
            out_configs[cid] = rebuild(cid, str(root))
    return out_configs
