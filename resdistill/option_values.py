"""The values options take: choices, stage presets, and the parsers of option texts.

Kept apart from :mod:`resdistill.config` (the config sections themselves) so each stays short;
:mod:`resdistill.config` re-exports the names other modules import from it.
"""

from __future__ import annotations

from typing import Any

#: Stages a TrainConfig can describe.
STAGE_TEACHER = "teacher"  # supervised at the dataset's (high) magnification
STAGE_SUPERVISED = "supervised"  # the low-magnification baseline: labels only, no teacher
STAGE_DISTILL = "distill"  # the student learns the frozen teacher's outputs, no labels
STAGES = (STAGE_TEACHER, STAGE_SUPERVISED, STAGE_DISTILL)

#: ``--arch`` choices: the keys of :data:`resdistill.models.ARCHITECTURES` (a test keeps them equal).
ARCH_CHOICES = ("resnet18", "resnet34", "resnet50", "resnet-small")
#: ``--head`` of a timm backbone: one linear layer, or Linear-GELU-Linear
HEAD_CHOICES = ("linear", "mlp")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant", "linear")
#: ``--amp``: ``auto`` is bf16 autocast on CUDA and none on CPU; ``bf16`` autocasts on any device
#: (CPU autocast is how the tests keep this path from rotting); ``off`` never does.
AMP_MODES = ("auto", "bf16", "off")
FEATURE_LOSSES = ("mse", "l1")
FEATURE_RESIZES = ("maxpool", "bicubic")
#: Colour jitter (brightness, contrast, saturation, hue) of the teacher. The paper's reference
#: code uses 0.5/0.5/0.5/0.2; milder jitter keeps stain-intensity cues learnable. Chosen on the
#: teacher's own validation over off / light / the paper's (``choose_defaults.py --recipes
#: teachers``, cohort seeds no report uses; docs/results.md, "How the defaults were chosen").
DEFAULT_JITTER = (0.2, 0.2, 0.2, 0.05)
#: A student's colour jitter: none, for the distilled student and the ``--supervised`` baseline
#: alike, each arm's own choice on validation over off / light / the paper's jitter
#: (``choose_defaults.py --recipes jitter``, cohort seeds no report uses).
STUDENT_JITTER = (0.0, 0.0, 0.0, 0.0)
#: KD temperature: the paper's 1, chosen on validation over 1, 2, 4 and 8 (``choose_defaults.py
#: --recipes temperature``, cohort seeds no report uses; the four were within half a point).
DEFAULT_TEMPERATURE = 1.0
#: Epochs of ``teacher`` and ``distill`` (the paper: 100).
DEFAULT_EPOCHS = 20
#: Smallest student tile edge (px) for attention transfer: the ResNets downsample 32x, so a
#: smaller tile gives a one-cell feature map, whose unit-norm attention is 1 whatever the input.
ATTENTION_MIN_PX = 64
#: ``--stain-norm`` methods (see :mod:`resdistill.data.stain_norm`); "" is off.
STAIN_NORMS = ("reinhard", "macenko")
DEFAULT_METRIC = "val_macro_f1"
#: What every model argument accepts (resolved by :func:`resdistill.model_spec.resolve_spec`).
MODEL_FORMS = (
    "a checkpoint folder, a run folder (its best checkpoint), a run summary JSON "
    "(--summary-json) or a tune result JSON; local or s3://"
)
#: ``--device`` of every command: ``auto`` is cuda when GPUs are there (the Ray cluster's for
#: training and prediction, this machine's for evaluation), else cpu (:func:`resolve_device`).
DEVICES = ("auto", "cpu", "cuda")
#: ``--tracking KIND[:TARGET]``: where every epoch is recorded (:mod:`resdistill.tracking`)
TRACKING_KINDS = ("tensorboard", "mlflow", "wandb", "none")
TRACKING_HELP = (
    "record params, every epoch's metrics and the best checkpoint (rank 0 only): tensorboard "
    "(event files in the run folder's tensorboard/, or DIR/<name>), mlflow (the run storage's "
    "sqlite mlflow.db, or a tracking URI; pip install 'resdistill[mlflow]'), wandb (PROJECT; "
    "pip install wandb) or none")  # fmt: skip


def tracking_ok(text: str) -> bool:
    """True when ``text`` is a ``--tracking`` value: a kind of :data:`TRACKING_KINDS`, with a
    ``:TARGET`` unless ``none``."""
    kind, _, target = text.partition(":")
    return kind in TRACKING_KINDS and not (kind == "none" and target)


def resolve_device(device: str, gpus: float) -> str:
    """``cpu`` or ``cuda`` for ``--device`` given ``gpus`` GPUs: auto -> cuda when there is one;
    cuda without one is refused (UsageError naming the flag) rather than failing in a worker."""
    from resdistill.errors import UsageError

    if device not in DEVICES:
        raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus <= 0:
        raise UsageError("--device cuda: no GPU is available (use --device cpu or auto)")
    return device


def hed_pair(values: tuple[float, ...] | list[float]) -> tuple[float, float]:
    """``(sigma, bias)`` of ``--hed-jitter SIGMA[,BIAS]``: BIAS defaults to SIGMA (Tellez et
    al.'s ``HED-light`` is 0.05, ``HED-strong`` 0.2); ``()`` or zeros mean off. ValueError
    when sigma is outside [0, 1) or bias is negative."""
    vals = tuple(float(v) for v in values)
    if len(vals) > 2:
        raise ValueError(f"--hed-jitter takes SIGMA[,BIAS], got {len(vals)} numbers")
    sigma = vals[0] if vals else 0.0
    bias = vals[1] if len(vals) > 1 else sigma
    if not 0.0 <= sigma < 1.0:
        raise ValueError(f"--hed-jitter sigma must be in [0, 1), got {sigma:g}")
    if bias < 0.0:
        raise ValueError(f"--hed-jitter bias must be 0 or more, got {bias:g}")
    return sigma, bias


def parse_floats(text: str) -> tuple[float, ...]:
    """``"0.2,0.2,0.2,0.05"`` -> ``(0.2, 0.2, 0.2, 0.05)``."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def parse_jitter(text: str) -> tuple[float, ...]:
    """``--jitter``: up to four numbers, the missing ones 0 (``--jitter 0`` turns it off)."""
    vals = parse_floats(text)
    if not 1 <= len(vals) <= 4:
        raise ValueError(
            f"expected 1 to 4 numbers brightness,contrast,saturation,hue, got {text!r}"
        )
    return (vals + (0.0, 0.0, 0.0))[:4]


def parse_hed(text: str) -> tuple[float, float]:
    return hed_pair(parse_floats(text))


def parse_stain_norm(text: str) -> str:
    return "" if text == "none" else text


def preset_text(key: str) -> str:
    return "; ".join(f"{stage} {shown(p[key])}" for stage, p in STAGE_PRESETS.items())


def shown(value: Any) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)


#: What differs between the stages when a field is left unset (None): a config built in Python
#: and the CLI's get the same values (:meth:`TrainConfig.__post_init__` fills them in).
STAGE_PRESETS: dict[str, dict[str, tuple[Any, ...]]] = {
    STAGE_TEACHER: {"train_splits": ("train",), "jitter": DEFAULT_JITTER},
    STAGE_SUPERVISED: {"train_splits": ("train",), "jitter": STUDENT_JITTER},
    STAGE_DISTILL: {"train_splits": ("train", "unlabeled"), "jitter": STUDENT_JITTER},
}
