"""Driver side: check a :class:`~resdistill.config.TrainConfig` against its dataset, teacher and
cached targets, and fill in what workers need (``plan``, ``teacher``), before any Ray work.

Every problem is a :class:`~resdistill.errors.UsageError` of one line naming the option or the
file and the fix. :func:`check` looks at option values alone; :func:`prepare` also reads
``dataset.json``, the manifest, the teacher's ``model.pt`` and ``targets.json``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from resdistill.config import (
    ATTENTION_MIN_PX,
    DEFAULT_JITTER,
    STAGE_DISTILL,
    STAGE_TEACHER,
    STAIN_NORMS,
    DataPlan,
    TeacherRef,
    TrainConfig,
    hed_pair,
)
from resdistill.errors import UsageError
from resdistill.train.selection import resolve_rule
from sharding.magnification import display_mag


def _stderr_note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def check(cfg: TrainConfig, note: Callable[[str], None] = _stderr_note) -> TrainConfig:
    """Refuse impossible option values (one line each); the config to run.

    With cached targets (``data.targets``) the default colour jitter is switched off (with a
    ``note``) and HED jitter is refused: the stored teacher outputs belong to the un-jittered
    tiles (targets are always made un-augmented).
    """
    for opt, value in (("batch-size", cfg.data.batch_size), ("epochs", cfg.optim.epochs),
                       ("workers", cfg.run.workers)):  # fmt: skip
        if value < 1:
            raise UsageError(f"--{opt} must be at least 1")
    if cfg.data.loader_workers < 0:
        raise UsageError("--loader-workers must be 0 or more")
    if cfg.data.steps_per_epoch is not None and cfg.data.steps_per_epoch < 1:
        raise UsageError("--steps-per-epoch must be at least 1")
    if not 0 <= cfg.data.unlabelled_share <= 1:
        raise UsageError("--unlabelled-share must be within 0..1")
    if cfg.optim.lr <= 0:
        raise UsageError("--lr must be positive")
    try:
        hed_pair(cfg.data.hed_jitter)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    loss = cfg.loss
    if cfg.stage == STAGE_DISTILL:
        if cfg.teacher is None:
            raise UsageError(
                "--teacher is required: a teacher checkpoint, run folder or run summary JSON "
                "(or pass --supervised for the labels-only baseline)"
            )
        if not loss.temperature > 0:
            raise UsageError("--temperature must be positive")
        if loss.kd_weight < 0 or loss.feature_weight < 0 or loss.attention_weight < 0:
            raise UsageError(
                "--kd-weight, --feature-weight and --attention-weight must be 0 or more"
            )
        if loss.kd_weight == 0 and loss.feature_weight == 0:
            raise UsageError("--kd-weight and --feature-weight are both 0: nothing to learn from")
    if cfg.data.targets:
        cfg = _check_targets(cfg, note)
    return cfg


def _check_targets(cfg: TrainConfig, note: Callable[[str], None]) -> TrainConfig:
    """Options ``--targets`` cannot honour (see :mod:`resdistill.train.targets`)."""
    if cfg.stage != STAGE_DISTILL:
        raise UsageError("--targets is for distillation; --supervised uses no teacher")
    if cfg.loss.feature_resize != "maxpool":
        raise UsageError(
            "--targets stores max-pooled teacher maps: --feature-resize must be maxpool"
        )
    if cfg.loss.feature_grid:  # LossConfig: a grid only with the feature term on
        raise UsageError(
            "--targets stores teacher maps pooled to the student's last map: --feature-grid "
            "needs the teacher's own map; distil online (without --targets)"
        )
    if any(float(v) for v in cfg.data.hed_jitter):
        raise UsageError(
            "--hed-jitter is not allowed with --targets: the teacher's stored outputs are of the "
            "un-jittered tiles; drop --hed-jitter, or distil online (without --targets)"
        )
    jitter = tuple(float(v) for v in cfg.data.jitter)
    if not any(jitter):
        return cfg
    if jitter != tuple(DEFAULT_JITTER):
        raise UsageError(
            "--jitter is not allowed with --targets: the teacher's stored outputs are of the "
            "un-jittered tiles (flips and 90-degree rotations are fine); pass --jitter 0"
        )
    note("--targets turns the default colour jitter off")
    return replace(cfg, data=replace(cfg.data, jitter=(0.0, 0.0, 0.0, 0.0)))


def _train_slides(
    cfg: TrainConfig, manifest: Any, splits: list[str], labelled: list[str] | None
) -> list[str] | None:
    """The slides a distillation run with ``data.unlabelled_share < 1`` reads (the labelled ones
    plus that share of the rest, :func:`resdistill.data.select_train_slides`); None: all."""
    from resdistill.data import select_train_slides

    share = cfg.data.unlabelled_share
    if share >= 1:
        return None
    if cfg.stage != STAGE_DISTILL:
        raise UsageError(
            "the unlabelled share applies to distillation: baselines read no such data"
        )
    try:
        return select_train_slides(manifest, splits, share, cfg.optim.seed, labelled)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def teacher_ref(url: str, classes: Sequence[str], *, evaluate: bool = True) -> TeacherRef:
    """Read a teacher checkpoint (``url``: any model argument,
    :mod:`resdistill.model_spec`) and check it against the dataset's ``classes``.

    Read by :func:`resdistill.checkpoint.load_model` (``weights_only=True``; the weights built
    into the stored ``arch`` to prove they fit), as every checkpoint is. The reference's
    ``checkpoint`` is the checkpoint folder (absolute), ``mag`` the one the teacher was trained
    at, ``normalization`` :func:`resdistill.checkpoint.normalization_of` (plus the stain
    reference, when there is one), so the teacher gets the inputs evaluation would give it.
    :class:`UsageError` (one line) when it is not a readable checkpoint or its classes (names and
    order) differ from the dataset's.
    """
    from resdistill.checkpoint import CheckpointError, absolute_url, load_model, normalization_of
    from resdistill.model_spec import checkpoint_folder
    from resdistill.train.backbone_plan import spatial_features

    url = absolute_url(url)
    try:  # any model argument's form; workers reread <folder>/model.pt
        teacher = load_model(checkpoint_folder(url))
    except CheckpointError as exc:
        raise UsageError(f"cannot load the teacher: {exc}") from None
    t_classes = list(teacher.classes)
    if t_classes != list(classes):
        raise UsageError(
            f"{url}: the teacher's classes {t_classes} differ from the dataset's {list(classes)}; "
            "distill on a dataset with the same classes, or train a teacher on this one"
        )
    mean, std = normalization_of(teacher)
    stain = teacher.card.stain_reference()
    return TeacherRef(
        checkpoint=absolute_url(teacher.url),
        arch=teacher.card.arch,
        mag=teacher.card.mag,
        classes=tuple(t_classes),
        feature_channels=int(teacher.model.feature_channels),
        spatial_features=spatial_features(teacher.model, teacher.card.tile_px),
        normalization={"mean": mean, "std": std, **({"stain": stain} if stain else {})},
        evaluate=evaluate,
    )


def _power(name: str) -> float:
    from sharding.magnification import Magnification

    return Magnification.parse(name).power


def prepare(
    cfg: TrainConfig,
    *,
    note: Callable[[str], None] = _stderr_note,
    notes: list[str] | None = None,
) -> TrainConfig:
    """:func:`check`, then the dataset, teacher and targets against ``cfg``: the config the
    workers run, with ``plan`` (counts, steps, labelled slides, ``dataset.json``, targets),
    ``teacher`` (distillation: its checkpoint's reference, fed at the resolved magnification),
    ``model.arch`` / ``model.mag`` resolved and ``data.url`` the dataset's own URL.

    Defaults resolved here: the teacher stage's magnification is the dataset's highest; a
    student's architecture is the teacher's ResNet (resnet18 without one, or for a timm
    teacher); the teacher is fed the
    magnification it was trained at; ``--select auto`` becomes the stage's rule
    (:func:`resdistill.train.selection.resolve_rule`), so checkpoints record the rule that chose.
    Remarks for the run's header go to ``notes``.
    """
    from resdistill.data import (
        Dataset,
        select_labelled_slides,
        shard_keys,
        steps_per_epoch,
    )

    cfg = check(cfg, note)
    notes = notes if notes is not None else []
    data = cfg.data
    dataset = Dataset.open(data.url)  # dataset.json and manifest.parquet, read once each
    info = dataset.info
    if cfg.stage == STAGE_TEACHER:
        mag = info.resolve_mag(cfg.model.mag or info.highest)
    if info.num_classes < 2:
        raise UsageError(f"{data.url}: dataset.json lists {info.num_classes} class(es), need 2+")
    supervised = cfg.supervised
    ref = None
    if cfg.teacher is not None:
        ref = teacher_ref(cfg.teacher.checkpoint, info.classes, evaluate=cfg.teacher.evaluate)
    if cfg.stage != STAGE_TEACHER:
        mag = info.resolve_mag(cfg.model.mag)
    teacher = None
    if cfg.stage == STAGE_DISTILL:
        assert ref is not None and cfg.teacher is not None
        trained = ref.mag or info.highest
        if not cfg.teacher.mag and trained not in info.magnifications:
            raise UsageError(
                f"{data.url}: the teacher was trained at {trained}, which this dataset lacks "
                f"({', '.join(info.magnifications)}): pass --teacher-mag"
            )
        t_mag = info.resolve_mag(cfg.teacher.mag or trained)
        if _power(mag) > _power(t_mag):
            raise UsageError(
                f"--student-mag {mag} is above the teacher's {t_mag}: the student "
                "learns at the lower magnification"
            )
        teacher = replace(ref, mag=t_mag)
        px = int(info.tile_px.get(mag, 0))
        if cfg.loss.attention_weight > 0 and px < ATTENTION_MIN_PX:
            raise UsageError(
                f"--attention-weight: the student's {display_mag(mag)} tiles are {px} px, whose "
                f"feature maps have one cell (no spatial attention to transfer); it needs "
                f"tiles of {ATTENTION_MIN_PX} px or more at the student's magnification"
            )
        if ref.mag and ref.mag != t_mag:
            notes.append(f"the teacher was trained at {ref.mag} and is fed {t_mag} tiles")
    # a student takes its teacher's ResNet; a timm (foundation-model) teacher's student is a
    # resnet18 unless --arch says otherwise
    inherit = ref is not None and not ref.arch.startswith("timm:")
    arch = cfg.model.arch or (ref.arch if inherit else "resnet18")
    splits = [s for s in data.train_splits if s]
    manifest = dataset.manifest()
    if data.label_fraction < 1 and not supervised and data.unlabelled_share >= 1:
        # distillation reads no labels; the fraction only says which slides count as labelled
        # (its teacher's) when it reads a share of the rest
        raise UsageError(
            "--label-fraction applies to --supervised (or, with --unlabelled-share, names the "
            "teacher's labelled slides): distillation uses no labels"
        )
    try:
        labelled = select_labelled_slides(manifest, splits, data.label_fraction, cfg.optim.seed)
    except ValueError as exc:
        raise UsageError(f"--label-fraction: {exc}") from None
    train_slides = _train_slides(cfg, manifest, splits, labelled)
    train_keys = shard_keys(manifest, splits, labelled_only=supervised, labelled_slides=labelled,
                            slides=train_slides)  # fmt: skip
    n_train = sum(len(v) for v in train_keys.values())
    n_labelled = sum(
        len(v)
        for v in shard_keys(
            manifest, splits, labelled_only=True, labelled_slides=labelled, slides=train_slides
        ).values()
    )
    n_val = sum(len(v) for v in shard_keys(manifest, [data.val_split], labelled_only=True).values())
    if n_val == 0:
        raise UsageError(f"{data.url}: split {data.val_split!r} has no labelled samples")
    n_val_slides = _labelled_slides(manifest, data.val_split)
    if n_train == 0:
        what = "labelled samples" if supervised else "samples"
        raise UsageError(f"{data.url}: split(s) {', '.join(splits)} hold no {what}")
    try:
        steps = data.steps_per_epoch or steps_per_epoch(n_train, cfg.run.workers, data.batch_size)
    except ValueError as exc:
        raise UsageError(f"{data.url}: {exc}") from None
    stain = _stain_reference(cfg, dataset, splits, teacher, notes)
    targets = None
    if data.targets:
        targets = _targets(data.targets, teacher, dataset, list(train_keys), mag)
        notes.append(
            f"cached teacher targets {targets['url']}: the teacher is not run during training"
        )
    if cfg.stage == STAGE_DISTILL and data.val_split in splits:
        notes.append(
            f"the student also distils on {data.val_split!r}, the split it is scored on (its "
            "labels stay unused)"
        )
    plan = DataPlan(
        dataset=dict(info.raw),
        n_train=n_train,
        n_labelled=n_labelled,
        n_val=n_val,
        train_shards=len(train_keys),
        steps_per_epoch=steps,
        labelled_slides=tuple(labelled) if labelled is not None else None,
        train_slides=tuple(train_slides) if train_slides is not None else None,
        targets=targets,
        n_val_slides=n_val_slides,
    )
    from resdistill.train.backbone_plan import plan_backbone

    planned = replace(
        cfg,
        run=replace(cfg.run, select=resolve_rule(cfg)),
        data=replace(data, url=info.url, train_splits=tuple(splits), **stain),
        model=replace(cfg.model, arch=arch, mag=mag),
        teacher=teacher,
        plan=plan,
    )
    return plan_backbone(planned, notes)  # --weights, timm backbones, the frozen head's cache


def _labelled_slides(manifest: Any, split: str) -> int:
    """How many slides of ``split`` hold a labelled sample (the label budget of selecting on it)."""
    import pyarrow.compute as pc

    part = manifest.filter(pc.and_(pc.equal(manifest["split"], split),
                                   pc.is_valid(manifest["label"])))  # fmt: skip
    return len(pc.unique(part["slide"]))


def _stain_reference(
    cfg: TrainConfig, dataset: Any, splits: list[str], teacher: TeacherRef | None, notes: list[str]
) -> dict[str, Any]:
    """``{"stain_norm", "stain_reference"}`` of the run, or ``{}`` without stain normalisation.

    A distilled student inherits its teacher's reference (both see the tiles the teacher was
    trained on); asking for a method the teacher was not trained with is refused. Other stages
    estimate it from the training splits at the dataset's top magnification (a fixed draw, so
    the teacher and the baseline of one dataset share it), unless the config already holds one.
    """
    from resdistill.data.stain_reference import reference_from_dataset

    data = cfg.data
    if data.stain_norm and data.stain_norm not in STAIN_NORMS:
        raise UsageError(f"--stain-norm {data.stain_norm}: choose from {', '.join(STAIN_NORMS)}")
    if cfg.stage == STAGE_DISTILL:
        assert teacher is not None
        ref = (teacher.normalization or {}).get("stain")
        method = ref.get("method", "") if ref else ""
        if data.stain_norm and data.stain_norm != method:
            was = f"with --stain-norm {method}" if method else "without stain normalisation"
            raise UsageError(
                f"--stain-norm {data.stain_norm}: the teacher was trained {was}, and a student "
                "sees its tiles as the teacher did; drop --stain-norm, or train the teacher "
                f"with --stain-norm {data.stain_norm}"
            )
        if not ref:
            return {}
        if data.targets:
            raise UsageError(
                "--targets with a stain-normalised teacher is not supported: the stored outputs "
                "are of un-normalised tiles; distil online (without --targets)"
            )
        if not data.stain_norm:
            notes.append(f"stain normalisation ({method}) as the teacher was trained with")
        return {"stain_norm": method, "stain_reference": dict(ref)}
    if not data.stain_norm:
        return {}
    if data.stain_reference and data.stain_reference.get("method") == data.stain_norm:
        return {}
    top = dataset.info.highest
    try:
        ref = reference_from_dataset(dataset, splits, top, data.stain_norm)
    except ValueError as exc:
        raise UsageError(f"--stain-norm {data.stain_norm}: {exc}") from None
    notes.append(
        f"stain normalisation ({data.stain_norm}) to a reference from {', '.join(splits)} at {top}"
    )
    return {"stain_reference": ref}


def _targets(
    url: str, teacher: TeacherRef | None, data: Any, shards: list[str], student_mag: str
) -> dict[str, Any]:
    """``{"url", "teacher_sha256", "doc"}`` of a target set verified for this run."""
    from resdistill.data.targets import check_for_distill

    assert teacher is not None
    try:
        return check_for_distill(url, teacher_checkpoint=teacher.checkpoint, data=data,
                                 train_shards=shards, student_mag=student_mag,
                                 teacher_mag=teacher.mag)  # fmt: skip
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
