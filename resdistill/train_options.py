"""Options shared by the training CLIs, without importing torch (``--help`` stays fast).

:data:`ARCH_CHOICES` lists :data:`resdistill.models.ARCHITECTURES` (a test keeps them equal).

``--amp``, ``--channels-last`` and ``--compile`` become worker config entries read by
:func:`resdistill.train_loop.worker_env`; :class:`resdistill.train_loop.WorkerEnv` applies them
(autocast context, input layout, ``prepare_model``).
"""

from __future__ import annotations

from typing import Any

from resdistill.config import AMP_MODES, ARCH_CHOICES  # noqa: F401 - ARCH_CHOICES re-exported


def add_speed_arguments(group: Any) -> None:
    """Add ``--amp``, ``--channels-last`` and ``--compile`` to an argparse parser or group."""
    group.add_argument(
        "--amp",
        default="auto",
        choices=AMP_MODES,
        help="bf16 autocast: auto (on GPU only), bf16 (also on CPU), off (default: %(default)s)",
    )
    group.add_argument(
        "--channels-last", action="store_true", help="NHWC weights and inputs (GPUs, oneDNN)"
    )
    group.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default="",
        metavar="BACKEND",
        help="torch.compile the model (inductor unless a backend is named; default: off)",
    )


def speed_config(args: Any) -> dict[str, Any]:
    """``{"amp", "channels_last", "compile"}`` of parsed arguments, for the worker config."""
    return {"amp": args.amp, "channels_last": bool(args.channels_last), "compile": args.compile}
