"""What the training commands (teacher, distill) share: group titles, the distillation-only
fields, and running a config with errors reported as one line."""

from __future__ import annotations

import sys
from collections.abc import Callable

from resdistill.commands.generate import Switch
from resdistill.config import TrainConfig

#: argument group titles of TrainConfig's sections
TITLES = {
    "data": "data",
    "model": "model",
    "optim": "optimisation",
    "loss": "loss",
    "speed": "speed (changes nothing that is learnt)",
    "run": "run",
    "teacher": "teacher",
}
#: the loss fields only distillation reads
KD_FIELDS = (
    "loss.temperature",
    "loss.kd_weight",
    "loss.feature_weight",
    "loss.feature_loss",
    "loss.feature_resize",
    "loss.attention_weight",
    "loss.feature_grid",
    "loss.kd_threshold",
    "loss.ce_weight",
)


def gpu_switch(path: str = "run.device") -> Switch:
    """``--gpu``: the short spelling of ``--device cuda``."""
    return Switch("--gpu", path, "cuda", "same as --device cuda")


def train(cfg: TrainConfig) -> object:
    """Run ``cfg`` (see :func:`resdistill.train.driver.train`): the RunSummary."""
    from resdistill.train.driver import train as run_train

    return run_train(cfg)


def exit_code(prog: str, work: Callable[[], object]) -> int:
    """Run ``work()``; errors as one line on stderr. 0 ok, 1 the run failed, 2 unusable input."""
    from resdistill.errors import UsageError

    try:
        work()
    except (UsageError, FileNotFoundError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ in ("TrainingFailedError", "ControllerError", "WorkerGroupError"):
            print(f"{prog}: training failed: {exc}", file=sys.stderr)
            return 1
        raise
    return 0
