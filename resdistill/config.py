"""Typed configuration of a training run, built once from the CLI and stored in checkpoints.

A :class:`TrainConfig` is what a stage's workers, Tune's trials and a checkpoint's readers see:

    TrainConfig(stage, data: DataConfig, model: ModelConfig, optim: OptimConfig,
                loss: LossConfig, speed: SpeedConfig, run: RunOptions,
                teacher: TeacherRef | None, plan: DataPlan | None)

Sections are frozen dataclasses of plain values, so ``to_dict()`` is JSON- and
``torch.load(weights_only=True)``-safe and ``TrainConfig.from_dict(to_dict())`` round-trips.
``plan`` holds what the driver derived from the dataset (sample counts, steps per epoch, the
labelled slides, a snapshot of ``dataset.json``), so workers never reread them.

Tunable settings are marked where they are declared (``metadata={"tune": ...}``): ``"pbt"`` for
the continuous ones Population Based Training may perturb in a running trial (a checkpoint stays
meaningful), ``"yes"`` for the rest. :func:`tunable` lists them by name per stage and
:meth:`TrainConfig.with_values` sets them by name, so Tune needs no second mapping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

#: Stages a TrainConfig can describe.
STAGE_TEACHER = "teacher"  # supervised at the dataset's (high) magnification
STAGE_SUPERVISED = "supervised"  # the low-magnification baseline: labels only, no teacher
STAGE_DISTILL = "distill"  # the student learns the frozen teacher's outputs, no labels
STAGES = (STAGE_TEACHER, STAGE_SUPERVISED, STAGE_DISTILL)

#: ``--arch`` choices: the keys of :data:`resdistill.models.ARCHITECTURES` (a test keeps them equal).
ARCH_CHOICES = ("resnet18", "resnet34", "resnet50", "resnet-small")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant", "linear")
#: ``--amp``: ``auto`` is bf16 autocast on CUDA and none on CPU; ``bf16`` autocasts on any device
#: (CPU autocast is how the tests keep this path from rotting); ``off`` never does.
AMP_MODES = ("auto", "bf16", "off")
FEATURE_LOSSES = ("mse", "l1")
FEATURE_RESIZES = ("maxpool", "bicubic")
#: Colour jitter (brightness, contrast, saturation, hue) of the teacher. The paper's reference
#: code uses 0.5/0.5/0.5/0.2; milder jitter keeps stain-intensity cues learnable. The teacher's,
#: the students' and the epochs' defaults were chosen by ``benchmarks/choose_defaults.py`` over
#: three synthetic cohorts (README, "How the defaults were chosen").
DEFAULT_JITTER = (0.2, 0.2, 0.2, 0.05)
#: A student's (distilled, or the ``--supervised`` baseline) colour jitter: none.
STUDENT_JITTER = (0.0, 0.0, 0.0, 0.0)
#: KD temperature: 4 passes a confident teacher's ranking of the other classes (the paper: 1).
DEFAULT_TEMPERATURE = 4.0
#: Epochs of ``teacher`` and ``distill`` (the paper: 100).
DEFAULT_EPOCHS = 20
#: Smallest student tile edge (px) for attention transfer: the ResNets downsample 32x, so a
#: smaller tile gives a one-cell feature map, whose unit-norm attention is 1 whatever the input.
ATTENTION_MIN_PX = 64
#: ``--stain-norm`` methods (see :mod:`resdistill.data.stain_norm`); "" is off.
STAIN_NORMS = ("reinhard", "macenko")
DEFAULT_METRIC = "val_macro_f1"

PBT = {"tune": "pbt"}  # tunable, and PBT may perturb it mid-trial
TUNE = {"tune": "yes"}  # tunable between trials only


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


@dataclass(frozen=True)
class DataConfig:
    """What the stage reads: the dataset, its splits, batching and augmentation."""

    url: str  # dataset root: a folder (absolute) or s3://bucket/prefix
    train_splits: tuple[str, ...] = ("train",)
    val_split: str = "val"
    label_fraction: float = 1.0  # share of training slides whose labels are used
    # distillation: share of the unlabelled training slides (labels hidden or absent) it reads
    unlabelled_share: float = 1.0
    batch_size: int = field(default=64, metadata=TUNE)  # per worker
    eval_batch_size: int | None = None  # None: batch_size
    loader_workers: int = 2  # DataLoader processes per Ray Train worker
    shuffle_buffer: int = 1000
    jitter: tuple[float, ...] = DEFAULT_JITTER  # brightness, contrast, saturation, hue
    flips: bool = True  # random flips and 90-degree rotations
    hed_jitter: tuple[float, ...] = (0.0, 0.0)  # HED stain jitter (sigma, bias); zeros: off
    stain_norm: str = ""  # stain normalisation method (STAIN_NORMS), "" for none
    stain_reference: Mapping[str, Any] | None = None  # its reference, filled in by the planner
    steps_per_epoch: int | None = None  # None: train samples // (workers x batch_size)
    targets: str | None = None  # cached teacher targets root (distillation only)

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or self.batch_size


@dataclass(frozen=True)
class ModelConfig:
    """The network that learns and the magnification it reads."""

    arch: str = "resnet18"
    mag: str = field(default="", metadata=TUNE)  # dataset name of the magnification, e.g. 2p5x


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and learning-rate schedule (see :mod:`resdistill.train.optim`)."""

    epochs: int = DEFAULT_EPOCHS
    lr: float = field(default=1e-3, metadata=PBT)
    weight_decay: float = field(default=1e-4, metadata=TUNE)
    optimizer: str = field(default="adam", metadata=TUNE)
    schedule: str = "cosine"
    warmup_epochs: float = field(default=0.0, metadata=TUNE)
    seed: int = 0


@dataclass(frozen=True)
class LossConfig:
    """Loss settings: KD + feature terms when distilling, label smoothing when supervised."""

    temperature: float = field(default=DEFAULT_TEMPERATURE, metadata=PBT)
    kd_weight: float = field(default=1.0, metadata=PBT)
    feature_weight: float = field(default=1.0, metadata=PBT)
    feature_loss: str = "mse"
    feature_resize: str = "maxpool"
    attention_weight: float = field(default=0.0, metadata=PBT)
    label_smoothing: float = field(default=0.0, metadata=PBT)


@dataclass(frozen=True)
class SpeedConfig:
    """How the worker runs the model; none of it changes what is learnt."""

    amp: str = "auto"  # bf16 autocast: auto (on CUDA), bf16, off
    channels_last: bool = False
    compile: str = ""  # torch.compile backend, "" for eager


@dataclass(frozen=True)
class RunOptions:
    """Where and how the Ray Train run executes."""

    name: str = ""
    storage: str = "runs"  # folder or s3://bucket/prefix; the run lives in <storage>/<name>
    workers: int = 2  # Ray Train workers (DDP ranks)
    cpus_per_worker: float = 1.0
    gpu: bool = False
    max_failures: int = 2
    keep: int = 1  # best checkpoints kept, plus the latest
    address: str | None = None
    metric: str = DEFAULT_METRIC
    mode: str = "max"
    log_every: int = 0
    trace_dir: str | None = None


@dataclass(frozen=True)
class TeacherRef:
    """The frozen teacher of a distillation run.

    From the command line only ``checkpoint``, ``mag`` (``--teacher-mag``, "" for the one it
    was trained at) and ``evaluate`` are known; :func:`resdistill.train.plan.prepare` reads the
    checkpoint and fills the rest.
    """

    checkpoint: str  # checkpoint folder URL (absolute once planned)
    arch: str = ""
    mag: str = ""  # magnification fed to the teacher
    classes: tuple[str, ...] = ()
    feature_channels: int = 0
    normalization: Mapping[str, Any] | None = None  # {"mean": [...], "std": [...]} it trained with
    evaluate: bool = True  # score the teacher once on the val split (teacher_val_*)


@dataclass(frozen=True)
class DataPlan:
    """What the driver derived from the dataset for this config (workers never reread it)."""

    dataset: Mapping[str, Any]  # dataset.json as read
    n_train: int
    n_labelled: int
    n_val: int
    train_shards: int
    steps_per_epoch: int
    labelled_slides: tuple[str, ...] | None = None  # None: every slide's labels
    train_slides: tuple[str, ...] | None = None  # None: every slide of the train splits
    targets: Mapping[str, Any] | None = None  # cached targets: {"url", "doc"} when used


@dataclass(frozen=True)
class TrainConfig:
    """One training run, every section typed; see the module docstring."""

    stage: str
    data: DataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    speed: SpeedConfig = SpeedConfig()
    run: RunOptions = RunOptions()
    teacher: TeacherRef | None = None
    plan: DataPlan | None = None

    @property
    def supervised(self) -> bool:
        """True for the stages that learn from labels (teacher and baseline)."""
        return self.stage != STAGE_DISTILL

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts/lists/scalars (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing ones take defaults."""
        return _build(cls, doc)

    def with_values(self, values: Mapping[str, Any]) -> TrainConfig:
        """A copy with tunable settings set by name (see :func:`tunable`), values cast to the
        field's type. ``KeyError`` naming the setting when it is not tunable for this stage."""
        out = self
        names = tunable(self.stage)
        for name, value in values.items():
            if name not in names:
                raise KeyError(
                    f"cannot tune {name!r} for the {self.stage} stage; tunable: "
                    f"{', '.join(sorted(names))}"
                )
            section = names[name].section
            current = getattr(out, section)
            cast = type(getattr(current, name))
            out = replace(out, **{section: replace(current, **{name: cast(value)})})
        return out


@dataclass(frozen=True)
class Tunable:
    """One tunable setting: its section of :class:`TrainConfig` and whether PBT may perturb it."""

    section: str
    pbt: bool


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "loss": LossConfig}
_DISTILL_ONLY = {"temperature", "kd_weight", "feature_weight", "attention_weight"}


def tunable(stage: str) -> dict[str, Tunable]:
    """The settings Tune may vary for ``stage``, by name, from the fields' ``tune`` metadata.

    The KD and feature weights and the temperature only exist when distilling; label smoothing
    only when learning from labels.
    """
    out: dict[str, Tunable] = {}
    for section, cls in _SECTIONS.items():
        for f in fields(cls):
            kind = f.metadata.get("tune")
            if not kind:
                continue
            if stage == STAGE_DISTILL and f.name == "label_smoothing":
                continue
            if stage != STAGE_DISTILL and f.name in _DISTILL_ONLY:
                continue
            out[f.name] = Tunable(section, kind == "pbt")
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, doc: Mapping[str, Any] | None) -> Any:
    """``cls(**doc)`` recursively for dataclass-typed fields; lists become tuples where the
    field's default or annotation is a tuple."""
    if doc is None:
        return None
    kwargs: dict[str, Any] = {}
    hints = _field_types(cls)
    for f in fields(cls):
        if f.name not in doc:
            continue
        value = doc[f.name]
        sub = hints.get(f.name)
        if sub is not None and is_dataclass(sub):
            value = _build(sub, value)
        elif isinstance(value, list) and "tuple" in str(f.type):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _field_types(cls: type) -> dict[str, type | None]:
    """Dataclass types of ``cls``'s fields (by annotation name; ``X | None`` counts as X)."""
    known = {
        c.__name__: c
        for c in (
            DataConfig,
            ModelConfig,
            OptimConfig,
            LossConfig,
            SpeedConfig,
            RunOptions,
            TeacherRef,
            DataPlan,
        )
    }
    out: dict[str, type | None] = {}
    for f in fields(cls):
        head = str(f.type).split("|")[0].strip()
        out[f.name] = known.get(head)
    return out
