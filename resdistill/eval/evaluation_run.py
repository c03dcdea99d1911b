"""The whole ``resdistill evaluate`` run: the models or the cascade, then ``config.yaml``.

Kept apart from :mod:`resdistill.eval.evaluate` (scoring models) and
:mod:`resdistill.eval.cascade_eval` (scoring a cascade, which builds on the former) so that
neither imports the other back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from resdistill.eval.cascade_eval import evaluate_cascade
from resdistill.eval.config import EvaluateConfig
from resdistill.eval.evaluate import evaluate_models
from resdistill.eval.results import EvaluationReport


def run_evaluation(
    cfg: EvaluateConfig, log: Callable[[str], None] | None = None
) -> tuple[EvaluationReport, dict[str, Any] | None]:
    """The whole ``resdistill evaluate``: :func:`evaluate_models`, or with ``cfg.cascade``
    :func:`resdistill.eval.cascade_eval.evaluate_cascade` (then the ``cascade.json`` document
    too); with ``cfg.out`` the resolved config is written there as ``config.yaml`` with the
    dataset's fingerprint, after the report (an unusable input leaves nothing behind)."""
    from resdistill.checkpoint import absolute_url
    from resdistill.data import DatasetInfo
    from resdistill.fields import to_plain
    from resdistill.run_config import write_run_config

    doc = None
    if cfg.cascade is None:
        report = evaluate_models(cfg, log=log)
    else:
        report, doc = evaluate_cascade(cfg, log=log)
    if cfg.out is not None:  # local paths made absolute: the file repeats the run from anywhere
        info = DatasetInfo.load(cfg.data)
        written = replace(
            cfg, checkpoints=tuple(absolute_url(c) for c in cfg.checkpoints),
            data=absolute_url(cfg.data), out=absolute_url(cfg.out),
            cascade=absolute_url(cfg.cascade) if cfg.cascade else None,
        )  # fmt: skip
        write_run_config(cfg.out, "evaluate", to_plain(written), dataset=(info.url, info.raw))
    return report, doc
