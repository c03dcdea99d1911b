"""Typed configuration of a training run, built once from the CLI and stored in checkpoints.

A :class:`TrainConfig` is what a stage's workers, Tune's trials and a checkpoint's readers see:

    TrainConfig(stage, data: DataConfig, model: ModelConfig, optim: OptimConfig,
                loss: LossConfig, speed: SpeedConfig, run: RunOptions,
                teacher: TeacherRef | None, plan: DataPlan | None)

Sections are frozen dataclasses of plain values, so ``to_dict()`` is JSON- and
``torch.load(weights_only=True)``-safe and ``TrainConfig.from_dict(to_dict())`` round-trips.
``plan`` holds what the driver derived from the dataset (sample counts, steps per epoch, the
labelled slides, a snapshot of ``dataset.json``), so workers never reread them.

The speed and run sections, how a run executes rather than what it learns, are declared in
:mod:`resdistill.run_options` and imported from here like the rest.

Every field is declared once with :func:`resdistill.fields.opt` (default, help, flag); the
CLI is generated from those declarations; choices, presets and value parsers are in
:mod:`resdistill.option_values`. Tunable settings are marked on the field (``tune=...``):
``"pbt"`` for the continuous ones Population Based Training may perturb in a running trial (a
checkpoint stays meaningful), ``"yes"`` for the rest. :func:`tunable` lists them by name per stage and
:meth:`TrainConfig.with_values` sets them by name, so Tune needs no second mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from resdistill.fields import ConfigError, check, check_choice, from_plain, opt, to_plain
from resdistill.option_values import (  # noqa: F401 - re-exported: one place to import configs from
    AMP_MODES,
    ARCH_CHOICES,
    ATTENTION_MIN_PX,
    DEFAULT_EPOCHS,
    DEFAULT_JITTER,
    DEFAULT_METRIC,
    DEFAULT_TEMPERATURE,
    DEVICES,
    FEATURE_LOSSES,
    FEATURE_RESIZES,
    HEAD_CHOICES,
    MODEL_FORMS,
    OPTIMIZERS,
    SCHEDULES,
    STAGE_DISTILL,
    STAGE_PRESETS,
    STAGE_SUPERVISED,
    STAGE_TEACHER,
    STAGES,
    STAIN_NORMS,
    STUDENT_JITTER,
    TRACKING_HELP,
    TRACKING_KINDS,
    hed_pair,
    parse_floats,
    parse_hed,
    parse_jitter,
    parse_stain_norm,
    preset_text,
    resolve_device,
    shown,
    tracking_ok,
)
from resdistill.run_options import (  # noqa: F401 - re-exported: one place to import configs from
    SELECT_RULES,
    RunOptions,
    SpeedConfig,
)


@dataclass(frozen=True)
class DataConfig:
    """What the stage reads: the dataset, its splits, batching and augmentation."""

    url: str = opt(help="dataset root: a folder or s3://bucket/prefix", flag="--data",
                   required=True)  # fmt: skip
    train_splits: tuple[str, ...] | None = opt(
        None, "comma list of splits to learn from; distillation uses every sample of them, "
        f"labelled or not (default by stage: {preset_text('train_splits')})")  # fmt: skip
    val_split: str = opt("val", "labelled split scored after every epoch")
    label_fraction: float = opt(
        1.0, "use the labels of only this share of the training slides (at least one per "
        "class; a label-scarce experiment); a distilled student counts the slides outside the "
        "share as unlabelled")  # fmt: skip
    unlabelled_share: float = opt(
        1.0, "distillation: read every labelled training slide plus only this share of the "
        "others (seeded; a smaller share is a subset of a larger one)")  # fmt: skip
    batch_size: int = opt(64, "per-worker batch size", tune="yes")
    eval_batch_size: int | None = opt(None, "evaluation batch size (default: --batch-size)")
    loader_workers: int = opt(2, "DataLoader processes per Ray Train worker")
    shuffle_buffer: int = opt(1000, "samples in the shuffle buffer")
    jitter: tuple[float, ...] | None = opt(
        None, "colour jitter brightness,contrast,saturation,hue, one draw for every "
        "magnification of a sample (0 disables; the paper: 0.5,0.5,0.5,0.2; default by stage: "
        f"{preset_text('jitter')})", parse=parse_jitter, metavar="B,C,S,H")  # fmt: skip
    flips: bool = opt(True, "random flips and 90-degree rotations")
    hed_jitter: tuple[float, ...] = opt(
        (0.0, 0.0), "stain jitter in haematoxylin-eosin-DAB space: each stain's amount C "
        "becomes C * U(1-SIGMA, 1+SIGMA) + U(-BIAS, BIAS), one draw per sample (BIAS defaults "
        "to SIGMA; 0 disables; Tellez et al. 2019: 0.05 light, 0.2 strong)",
        parse=parse_hed, metavar="SIGMA[,BIAS]")  # fmt: skip
    stain_norm: str = opt(
        "", "map every tile's colours onto a reference estimated from the training tiles at "
        "the top magnification: reinhard (LAB mean/std), macenko (stain vectors); a student "
        "inherits its teacher's (default: none)", choices=("", *STAIN_NORMS),
        parse=parse_stain_norm, metavar="{none,reinhard,macenko}")  # fmt: skip
    stain_reference: Mapping[str, Any] | None = opt(None, "filled in by the planner", cli=False)
    steps_per_epoch: int | None = opt(
        None, "batches per worker per epoch (default: train samples // (workers x batch))"
    )
    targets: str | None = opt(
        None, "cached teacher targets (a root written by `resdistill teacher-targets`): the "
        "student learns from the stored teacher outputs instead of running the teacher; flips "
        "and rotations stay, colour jitter is refused")  # fmt: skip

    def __post_init__(self) -> None:
        check(0.0 < self.label_fraction <= 1.0, "--label-fraction", "must be within 0..1, above 0")
        check(0.0 <= self.unlabelled_share <= 1.0, "--unlabelled-share", "must be within 0..1")
        check(self.batch_size >= 1, "--batch-size", "must be at least 1")
        check((self.eval_batch_size or 1) >= 1, "--eval-batch-size", "must be at least 1")
        check(self.loader_workers >= 0, "--loader-workers", "must be 0 or more")
        check((self.steps_per_epoch or 1) >= 1, "--steps-per-epoch", "must be at least 1")
        check(self.jitter is None or len(self.jitter) == 4, "--jitter",
              "takes four numbers: brightness,contrast,saturation,hue")  # fmt: skip
        check_choice(DataConfig, self, "stain_norm")
        try:
            hed_pair(self.hed_jitter)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or self.batch_size


@dataclass(frozen=True)
class ModelConfig:
    """The network that learns and the magnification it reads."""

    arch: str = opt("", "torchvision ResNet (random init) or timm:<name>, any timm model, e.g. "
                    "a pathology foundation model (default: a student takes its teacher's "
                    "ResNet; resnet18 otherwise)",
                    metavar="{" + ",".join(ARCH_CHOICES) + ",timm:NAME}")  # fmt: skip
    mag: str = opt("", "magnification to train at (default: the dataset's highest)", tune="yes")
    weights: str = opt("", "start from this local weights file (safetensors, .pth, .bin, or a "
                       "downloaded hub folder with config.json); never downloaded, never copied "
                       "into run folders (the checkpoint records its path and sha256)",
                       metavar="PATH")  # fmt: skip
    weights_licence: str = opt("", "a note on the weights' licence, recorded in checkpoints",
                               metavar="TEXT")  # fmt: skip
    freeze_backbone: bool = opt(False, "train only the head on a frozen timm backbone, from "
                                "embeddings computed once per dataset and cached")  # fmt: skip
    head: str = opt("linear", "classifier on a timm backbone's pooled embedding",
                    choices=HEAD_CHOICES)  # fmt: skip
    input_px: int = opt(0, "edge a timm backbone is fed: each tile is resized to it; 0: a "
                        "ViT's own input size (e.g. 224), no resize for a CNN")  # fmt: skip
    backbone_args: str = opt("", "timm create_model arguments: a JSON object or file (a hub "
                             "config.json works); mean/std keys set the input normalisation",
                             metavar="JSON")  # fmt: skip

    def __post_init__(self) -> None:
        check(self.arch in ("", *ARCH_CHOICES) or (self.arch.startswith("timm:") and
              len(self.arch) > 5), "--arch",
              f"choose one of {', '.join(ARCH_CHOICES)} or timm:<name>, got {self.arch!r}")  # fmt: skip
        check_choice(ModelConfig, self, "head")
        check(self.input_px >= 0, "--input-px", "must be 0 or more")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and learning-rate schedule (see :mod:`resdistill.train.optim`)."""

    epochs: int = opt(DEFAULT_EPOCHS, "total epochs of the run")
    lr: float = opt(1e-3, "peak learning rate", tune="pbt")
    weight_decay: float = opt(1e-4, "L2 weight decay", tune="yes")
    optimizer: str = opt("adam", "sgd: Nesterov 0.9", choices=OPTIMIZERS, tune="yes")
    schedule: str = opt("cosine", "learning-rate decay over all steps of --epochs",
                        choices=SCHEDULES)  # fmt: skip
    warmup_epochs: float = opt(0.0, "linear warm-up length", tune="yes")
    seed: int = opt(0, "model init, shuffling and augmentation")

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "--epochs", "must be at least 1")
        check(self.lr > 0, "--lr", "must be positive")
        check(self.weight_decay >= 0, "--weight-decay", "must be 0 or more")
        check(self.warmup_epochs >= 0, "--warmup-epochs", "must be 0 or more")
        check_choice(OptimConfig, self, "optimizer")
        check_choice(OptimConfig, self, "schedule")


@dataclass(frozen=True)
class LossConfig:
    """Loss settings: KD + feature terms when distilling, label smoothing when supervised."""

    temperature: float = opt(DEFAULT_TEMPERATURE, "KD temperature T (the paper: 1)", tune="pbt")
    kd_weight: float = opt(1.0, "weight of the KD term", tune="pbt")
    feature_weight: float = opt(
        0.0, "weight of the feature term (the paper: 1; 0, the default, is KD alone: the feature "
        "term did not earn its place on validation, docs/results.md)", tune="pbt")  # fmt: skip
    feature_loss: str = opt("mse", "distance of the feature maps", choices=FEATURE_LOSSES)
    feature_resize: str = opt("maxpool", "how the teacher's feature map is brought to the "
                              "student's size", choices=FEATURE_RESIZES)  # fmt: skip
    feature_grid: int = opt(
        0, "where the feature term compares maps: 0, the student's last conv map against the "
        "teacher's pooled to its size (the paper; one cell, the global maximum, on tiles under "
        "64 px at the student's magnification); N >= 2, an N x N grid: the deepest student "
        "stage with N x N cells or more, through a learnt 1x1 projection, against the "
        "teacher's last map, both pooled to N x N (spatial correspondence at 2.5x and 1.25x)")  # fmt: skip
    kd_threshold: float = opt(
        0.0, "confidence masking of the KD term (FixMatch): only tiles whose teacher's top "
        "softmax probability at T=1 reaches this teach (0: every tile, the paper)")  # fmt: skip
    attention_weight: float = opt(
        0.0, "weight of inter-resolution attention transfer (del Amor et al. 2024): the "
        "student's class attention map (Grad-CAM of the teacher's class) matched to the "
        f"teacher's; needs student tiles of {ATTENTION_MIN_PX} px or more (0: off)",
        tune="pbt")  # fmt: skip
    label_smoothing: float = opt(0.0, "cross-entropy label smoothing (teacher, --supervised)",
                                 tune="pbt")  # fmt: skip
    ce_weight: float = opt(
        0.0, "weight of a cross-entropy term on the tiles of labelled training slides, added "
        "to the distillation loss (semi-supervised training, as FixMatch and Noisy Student keep "
        "one; the study's self-training control uses 1). 0, the default, keeps distillation "
        "label-free: labels are then never read")  # fmt: skip

    def __post_init__(self) -> None:
        check(self.temperature > 0, "--temperature", "must be positive")
        for name in ("kd_weight", "feature_weight", "attention_weight", "ce_weight"):
            check(getattr(self, name) >= 0, "--" + name.replace("_", "-"), "must be 0 or more")
        check(0.0 <= self.label_smoothing < 1.0, "--label-smoothing", "must be in [0, 1)")
        check_choice(LossConfig, self, "feature_loss")
        check_choice(LossConfig, self, "feature_resize")
        check(self.feature_grid == 0 or self.feature_grid >= 2, "--feature-grid",
              "must be 0 (the last map) or at least 2")  # fmt: skip
        check(not (self.feature_grid and self.feature_weight == 0), "--feature-grid",
              "places the feature term, which is off: pass --feature-weight above 0 too")  # fmt: skip
        check(0.0 <= self.kd_threshold < 1.0, "--kd-threshold", "must be in [0, 1)")


@dataclass(frozen=True)
class TeacherRef:
    """The frozen teacher of a distillation run.

    From the command line only ``checkpoint`` (any model argument, see
    :mod:`resdistill.model_spec`), ``mag`` and ``evaluate`` are known;
    :func:`resdistill.train.preflight.prepare` resolves ``checkpoint`` to the checkpoint folder,
    reads it and fills the rest.
    """

    checkpoint: str = opt(
        help=f"the teacher: {MODEL_FORMS}, as `resdistill teacher` prints them; required unless "
        "--supervised (then only its architecture is used, as --arch's default)",
        flag="--teacher")  # fmt: skip
    arch: str = opt("", cli=False)
    mag: str = opt("", "magnification fed to the teacher (default: the one it was trained at)",
                   flag="--teacher-mag")  # fmt: skip
    classes: tuple[str, ...] = opt((), cli=False)
    feature_channels: int = opt(0, cli=False)
    spatial_features: bool = opt(True, cli=False)  # False: a backbone without a spatial map
    normalization: Mapping[str, Any] | None = opt(None, cli=False)  # {"mean": [...], "std": [...]}
    evaluate: bool = opt(True, "score the teacher once on --val-split (reported as "
                         "teacher_val_*)", flag="--teacher-eval")  # fmt: skip


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
    n_val_slides: int = 0  # slides of the val split holding a labelled sample
    backbone: Mapping[str, Any] | None = None  # resdistill.backbones.BackboneSpec, when one
    embeddings: Mapping[str, Any] | None = None  # frozen backbone: the cached embeddings


@dataclass(frozen=True)
class TrainConfig:
    """One training run, every section typed; see the module docstring.

    Fields left None take the stage's preset (:data:`STAGE_PRESETS`); a baseline
    (``supervised``) never scores a teacher.
    """

    stage: str = opt(choices=STAGES, cli=False)
    data: DataConfig = opt()
    model: ModelConfig = opt(ModelConfig())
    optim: OptimConfig = opt(OptimConfig())
    loss: LossConfig = opt(LossConfig())
    speed: SpeedConfig = opt(SpeedConfig())
    run: RunOptions = opt(RunOptions())
    teacher: TeacherRef | None = opt(None)
    plan: DataPlan | None = opt(None, cli=False)

    def __post_init__(self) -> None:
        check_choice(TrainConfig, self, "stage")
        preset = STAGE_PRESETS[self.stage]
        filled = {k: v for k, v in preset.items() if getattr(self.data, k) is None}
        if filled:
            object.__setattr__(self, "data", replace(self.data, **filled))
        check(self.run.select != "distill-loss" or self.stage == STAGE_DISTILL, "--select",
              "distill-loss needs a teacher: the teacher and --supervised choose by metric or "
              "last")  # fmt: skip
        if self.stage == STAGE_SUPERVISED and self.teacher is not None and self.teacher.evaluate:
            object.__setattr__(self, "teacher", replace(self.teacher, evaluate=False))

    @property
    def supervised(self) -> bool:
        """True for the stages that learn from labels (teacher and baseline)."""
        return self.stage != STAGE_DISTILL

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts/lists/scalars (tuples become lists)."""
        return to_plain(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing ones take defaults."""
        return from_plain(cls, doc)

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
