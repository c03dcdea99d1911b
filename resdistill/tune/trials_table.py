"""What a finished tuning run reports: a row per trial, the best trial, the best-json.

Trials and their checkpoints are ranked by the trials' own checkpoint rule
(:func:`resdistill.tune.stage.ranking`). The best-json (``--best-json``) is ``{"checkpoint": url,
"config": {...}, "metric": name, "value": the best checkpoint's value, "select": the rule,
"labelled_val_slides": the validation slides whose labels chose (0: label-free), ...}``, which
``resdistill evaluate`` accepts as a model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from resdistill.checkpoint import checkpoint_url
from resdistill.train.runner import run_url
from resdistill.train.selection import Selection
from resdistill.tune.config import TuneConfig
from resdistill.tune.space import Domain
from resdistill.tune.stage import canonical, ranking
from sharding.magnification import display_mag


@dataclass
class TrialRow:
    """One line of the final table."""

    trial: str
    status: str
    config: dict[str, Any]
    epochs: int
    last: float | None
    best: float | None
    best_epoch: int | None
    checkpoint: str | None


@dataclass
class TuneSummary:
    """What a finished tuning run printed and wrote (``--best-json``): ``metric``/``mode`` rank
    under rule ``select``; ``labelled_val_slides`` chose by their labels (label budget)."""

    name: str
    url: str
    metric: str
    mode: str
    trials: list[TrialRow]
    best: dict[str, Any] | None
    resumed: bool
    elapsed_s: float
    select: str = "metric"
    labelled_val_slides: int = 0

    @property
    def selection(self) -> Selection:
        """The rule that ranked, as :class:`~resdistill.train.selection.Selection`."""
        return Selection(self.select, self.metric, self.mode, self.labelled_val_slides)


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


_TRIAL_DIR = re.compile(r"_([0-9a-f]{5}_\d{5})_\d+_")


def trial_id_of(path: str) -> str:
    """The Tune trial id in a trial folder's name (``<trainable>_<id>_<index>_<tag>_<date>``,
    e.g. ``trial_function_96532_00001_1_lr=...`` -> ``96532_00001``), else the folder name.

    Not ``result.metrics["trial_id"]``: after a PBT exploit that leaves nothing to train, Tune
    repeats the donor's last result (with the donor's id) as the trial's final one.
    """
    name = path.rstrip("/").rsplit("/", 1)[-1]
    match = _TRIAL_DIR.search(name)
    return match.group(1) if match else name


def _best_of(df: Any, metric: str, sign: float) -> tuple[float | None, int | None]:
    """The best value of ``metric`` over a trial's reported rows, and its epoch."""
    if df is None or metric not in df or not len(df):
        return None, None
    vals = df[metric].astype(float)
    if not vals.notna().any():
        return None, None
    idx = (vals * sign).idxmax()
    return float(vals[idx]), (int(df["epoch"][idx]) if "epoch" in df else None)


def summarize(grid: Any, cfg: TuneConfig, name: str, space: Mapping[str, Domain], *,
              resumed: bool, elapsed_s: float, chosen: Selection | None = None) -> TuneSummary:  # fmt: skip
    """Rows per trial (best by ``chosen``, default :func:`~resdistill.tune.stage.ranking` of
    ``cfg``, over every reported epoch) and the best trial's best kept Tune checkpoint (a full
    copy of the Train checkpoint: ``model.pt``, ``trainer.pt``)."""
    chosen = chosen or ranking(cfg)
    metric, mode, storage = chosen.metric, chosen.mode, cfg.train.run.storage
    sign = 1.0 if mode == "max" else -1.0
    rows: list[TrialRow] = []
    best: dict[str, Any] | None = None
    best_key: float | None = None
    for result in grid:
        metrics = result.metrics or {}
        trial = trial_id_of(result.path)
        best_val, best_epoch = _best_of(result.metrics_dataframe, metric, sign)
        ckpt = None
        with contextlib.suppress(Exception):  # no checkpoint kept
            ckpt = result.get_best_checkpoint(metric, mode)
        ckpt = ckpt or result.checkpoint
        epochs = int(metrics.get("epoch", 0) or 0)
        done = epochs >= cfg.train.optim.epochs
        status = "error" if result.error else ("done" if done else "stopped")
        config = {k: result.config.get(k) for k in space if k in (result.config or {})}
        row = TrialRow(trial, status, config, epochs, _num(metrics.get(metric)), best_val,
                       best_epoch, checkpoint_url(ckpt))  # fmt: skip
        rows.append(row)
        if (
            best_val is not None
            and row.checkpoint
            and (best_key is None or sign * best_val > best_key)
        ):
            best_key = sign * best_val
            ckpt_metrics = _checkpoint_metrics(result, ckpt)
            best = {
                "checkpoint": row.checkpoint,
                "config": dict(result.config or {}),
                "metric": metric,
                "mode": mode,
                "select": chosen.rule,
                "labelled_val_slides": chosen.labelled_val_slides,
                "value": _num(ckpt_metrics.get(metric, best_val)),
                "epoch": ckpt_metrics.get("epoch", best_epoch),
                "trial": trial,
                "best_value": best_val,
                "stage": cfg.stage,
                "run": run_url(storage, name),
            }
    rows.sort(key=lambda r: (r.best is None, -sign * (r.best or 0.0)))
    return TuneSummary(name, run_url(storage, name), metric, mode, rows, best, resumed,
                       elapsed_s, chosen.rule, chosen.labelled_val_slides)  # fmt: skip


def _checkpoint_metrics(result: Any, ckpt: Any) -> dict[str, Any]:
    for c, m in result.best_checkpoints or []:
        if ckpt is not None and c.path == ckpt.path:
            return dict(m)
    return {}


def _fmt(value: Any, key: str = "") -> str:
    """A value of the table: ``-`` for none, floats to 4 digits, a magnification (``mag``,
    ``student_mag``) as users write it (2.5x, not the file-name form 2p5x)."""
    if value is None:
        return "-"
    if canonical(key) == "mag":
        with contextlib.suppress(ValueError):
            return display_mag(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_summary(summary: TuneSummary, space: Mapping[str, Domain], console: Any = None) -> None:
    """A rich table of trials (best first) and the best configuration."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    table = Table(title=f"tuning run {summary.name}", header_style="bold")
    for col in (
        "trial",
        "status",
        *space,
        "epochs",
        f"last {summary.metric}",
        f"best {summary.metric}",
    ):
        table.add_column(col)
    for row in summary.trials:
        table.add_row(row.trial, row.status, *(_fmt(row.config.get(k), k) for k in space),
                      str(row.epochs), _fmt(row.last), _fmt(row.best))  # fmt: skip
    console.print(table)
    console.print(f"run:             {summary.url}")
    console.print(f"ranked by:       {summary.selection.describe()}", soft_wrap=True)
    console.print(f"label budget:    {summary.labelled_val_slides} labelled validation slides "
                  "chose the trial and its checkpoint")  # fmt: skip
    if summary.best is None:
        console.print("[yellow]no trial reported the metric with a checkpoint[/]")
        return
    b = summary.best
    cfg = ", ".join(f"{k}={_fmt(b['config'].get(k), k)}" for k in space if k in b["config"])
    console.print(
        f"best trial:      {b['trial']} ({summary.metric} {_fmt(b['value'])} at epoch {b['epoch']})"
    )
    console.print(f"best config:     {cfg}")
    console.print(f"best checkpoint: {b['checkpoint']}")


def write_best_json(path: str, best: Mapping[str, Any]) -> None:
    """``{"checkpoint", "config", "metric", "value", ...}`` to a local file or ``s3://`` URL
    (locally through a temporary file, so a reader never sees half of it)."""
    from sharding.storage import is_remote, open_storage

    text = json.dumps(dict(best), indent=1, default=str) + "\n"
    if is_remote(path):
        parent, _, leaf = path.rstrip("/").rpartition("/")
        open_storage(parent).write_bytes(leaf, text.encode())
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
