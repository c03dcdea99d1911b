"""The torch side of :mod:`resdistill.distill`: the frozen teacher, one distillation step, and the
Ray Train function every DDP rank runs (kept apart so ``resdistill --help`` imports no torch).

One step of resolution distillation (DiPalma et al. 2021, arXiv:2101.04170) on a batch holding
the student-magnification tiles ``x_s`` (``batch.images[0]``) and the teacher-magnification tiles
``x_t`` of the same regions (``batch.images[1]``)::

    (t, f_t) = teacher(x_t)        # frozen, eval mode, no gradients
    (s, f_s) = student(x_s)
    L = kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T))
      + feature_weight * mean((P(f_s) - resize(f_t, size(f_s)))^2)      (or |.| with l1)

(:class:`resdistill.losses.DistillLoss`; ``P`` a learnt 1x1 convolution only when student and
teacher feature channels differ). :func:`distill_batch` never reads ``batch.labels``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from resdistill.losses import DistillLoss


def renormalizer(
    src: tuple[Sequence[float], Sequence[float]], dst: tuple[Sequence[float], Sequence[float]]
) -> tuple[list[float], list[float]] | None:
    """Per-channel ``(scale, shift)`` turning inputs normalised with ``src = (mean, std)`` into
    inputs normalised with ``dst``: ``(x * std_s + mean_s - mean_d) / std_d = x * scale + shift``,
    ``scale = std_s / std_d``, ``shift = (mean_s - mean_d) / std_d``. None when both agree to 1e-6
    (the teacher then sees the stream's tensors unchanged).
    """
    (ms, ss), (md, sd) = src, dst
    if all(abs(a - b) <= 1e-6 for a, b in zip([*ms, *ss], [*md, *sd], strict=True)):
        return None
    scale = [float(s) / float(d) for s, d in zip(ss, sd, strict=True)]
    shift = [(float(a) - float(b)) / float(d) for a, b, d in zip(ms, md, sd, strict=True)]
    return scale, shift


class FrozenTeacher(nn.Module):
    """A teacher that cannot learn: parameters without gradients, always in eval mode
    (``train()`` is a no-op, so batch-norm statistics never move), forward under ``no_grad``.

    ``forward(x) = net(x * scale + shift)`` -> ``(logits, features)``; ``(scale, shift)`` (see
    :func:`renormalizer`) map the data stream's normalisation at the teacher's magnification onto
    the one the teacher was trained with, identity when they agree.
    """

    def __init__(
        self, net: nn.Module, renorm: tuple[Sequence[float], Sequence[float]] | None = None
    ) -> None:
        super().__init__()
        self.net = net
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.renormalises = renorm is not None
        scale, shift = renorm if renorm is not None else ([1.0] * 3, [0.0] * 3)
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1))
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Always eval mode, whatever ``mode`` says."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            if self.renormalises:
                x = x * self.scale + self.shift
            return self.net(x)


def load_teacher(url: str, device: torch.device | str = "cpu", renorm: Any = None) -> FrozenTeacher:
    """The teacher of checkpoint folder ``url`` (``model.pt``, ``weights_only=True``), frozen."""
    from resdistill import train_loop as T
    from resdistill.models import build_model

    ckpt = T.load_checkpoint(url)
    net = build_model(ckpt["arch"], len(ckpt["classes"]))
    net.load_state_dict(ckpt["state_dict"])
    return FrozenTeacher(net, renorm).to(device)


class DistillStep(nn.Module):
    """Student plus distillation loss in one module, so DDP averages the gradients of every
    trainable parameter (the loss's optional 1x1 channel projection included).

    ``forward(x_s, t_logits, t_features) -> (total, parts, s_logits)`` with ``(s_logits,
    s_features) = student(x_s)`` and ``(total, parts) = loss(s_logits, t_logits, s_features,
    t_features)``: no label anywhere.
    """

    def __init__(self, student: nn.Module, loss: DistillLoss) -> None:
        super().__init__()
        self.student = student
        self.loss = loss

    def forward(
        self, x: torch.Tensor, t_logits: torch.Tensor, t_features: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        s_logits, s_features = self.student(x)
        total, parts = self.loss(s_logits, t_logits, s_features, t_features)
        return total, parts, s_logits


def build_loss(
    loss_cfg: Mapping[str, Any], student_channels: int, teacher_channels: int
) -> DistillLoss:
    """:class:`DistillLoss` from a config's ``loss`` section (temperature, kd_weight,
    feature_weight, feature_loss, feature_resize); with a trainable 1x1 projection
    ``student_channels -> teacher_channels`` only when the two differ."""
    proj = student_channels != teacher_channels
    return DistillLoss(
        kd_weight=loss_cfg["kd_weight"],
        feature_weight=loss_cfg["feature_weight"],
        temperature=loss_cfg["temperature"],
        feature_mode=loss_cfg["feature_loss"],
        resize=loss_cfg["feature_resize"],
        student_channels=student_channels if proj else None,
        teacher_channels=teacher_channels if proj else None,
    )


def _as_is(x: torch.Tensor) -> torch.Tensor:
    return x


def distill_batch(
    step: nn.Module,
    teacher: nn.Module,
    batch: Any,
    *,
    move: Callable[[torch.Tensor], torch.Tensor] = _as_is,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The distillation loss of one batch: ``(total, parts, student_logits, teacher_logits)``.

    Reads ``batch.images[0]`` (student magnification) and ``batch.images[1]`` (teacher
    magnification) and nothing else: ``batch.labels`` is never touched, so neither a label nor
    its absence (-1) can change the loss or its gradients. ``step`` is a (possibly DDP-wrapped)
    :class:`DistillStep`, ``teacher`` a :class:`FrozenTeacher`. ``move`` puts each input where the
    models are (a worker passes :meth:`resdistill.train_loop.WorkerEnv.input`).
    """
    x_s, x_t = move(batch.images[0]), move(batch.images[1])
    with autocast():
        t_logits, t_features = teacher(x_t)
        total, parts, s_logits = step(x_s, t_logits, t_features)
    return total, parts, s_logits, t_logits


def cached_distill_batch(
    step: nn.Module,
    batch: Any,
    *,
    move: Callable[[torch.Tensor], torch.Tensor] = _as_is,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """:func:`distill_batch` from cached teacher targets: ``batch.images`` is ``(x_s, t_logits,
    t_features)`` (:mod:`resdistill.cached_targets`), the teacher's feature map already pooled to
    the student's size (so ``DistillLoss``'s resize is the identity). Same loss, no teacher run;
    ``batch.labels`` is never read."""
    x_s, t_logits, t_features = (move(t) for t in batch.images)
    with autocast():
        total, parts, s_logits = step(x_s, t_logits, t_features)
    return total, parts, s_logits, t_logits


# --------------------------------------------------------------------------------------------------
# The training function (runs on every Ray Train worker)
# --------------------------------------------------------------------------------------------------


def train_worker(config: dict[str, Any]) -> None:
    """One DDP rank: stream paired tiles, distil (or fit labels), validate, checkpoint each epoch.

    ``config`` is built by :func:`resdistill.distill.build_config`.
    """
    from resdistill import data as D
    from resdistill import train_loop as T
    from resdistill.models import build_model

    env = T.worker_env(config)
    torch.manual_seed(config["seed"])  # same init on every rank (DDP also broadcasts rank 0's)
    info = D.DatasetInfo.from_json(config["data"], config["dataset"])
    supervised = config["supervised"]
    s_mag, t_mag = config["student_mag"], config["teacher_mag"]
    stage = config["stage"]
    log = T.console_log(f"[{stage}] ")
    tracer = T.Tracer(config.get("trace_dir"), env)
    loss_cfg = config["loss"]
    tmeta = config["teacher"]
    cached = config.get("targets")  # cached teacher targets: the teacher is not run per step

    student = build_model(config["arch"], info.num_classes)
    teacher: FrozenTeacher | None = None
    distill_loss: DistillLoss | None = None
    if not supervised:
        renorm = None
        if tmeta.get("normalization"):
            tn = tmeta["normalization"]
            renorm = renormalizer(info.mean_std(t_mag), (tn["mean"], tn["std"]))
        if not cached or config["teacher_eval"]:
            teacher = load_teacher(tmeta["checkpoint"], env.device, renorm)
            if env.channels_last:
                teacher = teacher.to(memory_format=torch.channels_last)
        distill_loss = build_loss(loss_cfg, student.feature_channels, tmeta["feature_channels"])

    restored = T.restore()
    state = T.TrainState()
    teacher_val: dict[str, float] = {}
    if restored is not None:
        student.load_state_dict(restored.model["state_dict"])
        if distill_loss is not None and restored.trainer.get("loss"):
            distill_loss.load_state_dict(restored.trainer["loss"])
        teacher_val = dict(restored.trainer.get("teacher_val") or {})
        state = restored.state
        if env.is_main:
            log(f"resuming after epoch {state.epoch} from {restored.path}")
    tracer.start(state.epoch)

    if supervised:
        model = T.prepare_model(student, env)
    else:
        assert distill_loss is not None
        model = T.prepare_model(
            DistillStep(student, distill_loss), env, find_unused=loss_cfg["kd_weight"] == 0
        )
    optimizer = T.make_optimizer(
        model.parameters(), config["optimizer"], config["lr"], config["weight_decay"]
    )
    if restored is not None:
        optimizer.load_state_dict(restored.trainer["optimizer"])

    manifest = D.read_manifest(info.url)
    common: dict[str, Any] = {
        "rank": env.rank,
        "world_size": env.world_size,
        "num_workers": config["loader_workers"],
        "pin_memory": env.use_cuda,
        "manifest": manifest,
    }
    if cached:
        from resdistill.data.cached import GeometricAugment, make_cached_loader
        from resdistill.teacher_targets import TargetsIndex

        train_loader = make_cached_loader(
            info,
            config["train_splits"],
            s_mag,
            TargetsIndex(cached["url"], cached["doc"]),
            batch_size=config["batch_size"],
            shuffle_buffer=config["shuffle_buffer"],
            augment=GeometricAugment(flips=config["flips"]),
            seed=config["seed"],
            epoch=state.epoch,
            steps=config["steps_per_epoch"],
            rank=env.rank,
            world_size=env.world_size,
            num_workers=config["loader_workers"],
            pin_memory=env.use_cuda,
            manifest=manifest,
        )
    else:
        train_loader = D.make_loader(
            info,
            config["train_splits"],
            [s_mag] if supervised else [s_mag, t_mag],
            batch_size=config["batch_size"],
            train=True,
            shuffle_buffer=config["shuffle_buffer"],
            augment=D.PairedAugment(config["jitter"], flips=config["flips"]),
            seed=config["seed"],
            epoch=state.epoch,
            steps=config["steps_per_epoch"],
            labelled_only=supervised,
            labelled_slides=config.get("labelled_slides"),
            **common,
        )
    val_loader = D.make_loader(
        info,
        [config["val_split"]],
        [s_mag],
        batch_size=config["eval_batch_size"],
        train=False,
        labelled_only=True,
        **common,
    )
    if teacher is not None and config["teacher_eval"] and not teacher_val:
        teacher_val = _score_teacher(teacher, info, config, env, common, log)

    steps = train_loader.steps or 1
    total_steps = config["epochs"] * steps
    warmup = int(round(config["warmup_epochs"] * steps))
    ce = nn.CrossEntropyLoss(label_smoothing=loss_cfg["label_smoothing"])
    keys = (
        ("train_loss", "train_accuracy")
        if supervised
        else ("train_loss", "train_kd", "train_feature", "train_agreement")
    )

    def lr_now() -> float:
        return T.lr_at(
            state.step,
            base_lr=config["lr"],
            total_steps=total_steps,
            schedule=config["schedule"],
            warmup_steps=warmup,
        )

    def train_epoch(epoch: int) -> T.EpochResult:
        model.train()
        sums = {k: torch.zeros((), device=env.device) for k in keys}
        n = done = 0
        for batch in train_loader.epoch():
            T.set_lr(optimizer, lr_now())
            b = len(batch)
            if supervised:
                x = env.input(batch.images[0])
                y = batch.labels.to(env.device, non_blocking=True)
                with env.autocast():
                    logits, _ = model(x)
                loss = ce(logits.float(), y)
                sums["train_accuracy"] += (logits.detach().argmax(1) == y).sum()
            else:
                if cached:
                    loss, parts, logits, t_logits = cached_distill_batch(
                        model, batch, move=env.input, autocast=env.autocast
                    )
                else:
                    loss, parts, logits, t_logits = distill_batch(
                        model, teacher, batch, move=env.input, autocast=env.autocast
                    )
                sums["train_kd"] += parts["kd"] * b
                sums["train_feature"] += parts["feature"] * b
                sums["train_agreement"] += (logits.detach().argmax(1) == t_logits.argmax(1)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state.step += 1
            done += 1
            sums["train_loss"] += loss.detach() * b
            n += b
            if config["log_every"] and env.is_main and done % config["log_every"] == 0:
                log(f"epoch {epoch} step {done}/{steps} loss {float(loss):.4f}")
        metrics = T.reduce_means({k: float(v) for k, v in sums.items()}, n, env)
        metrics["lr"] = lr_now()
        return T.EpochResult(metrics, done, n)

    def validate(epoch: int) -> dict[str, float]:
        return {**T.evaluate(student, val_loader, env, info.num_classes), **teacher_val}

    def model_payload() -> dict[str, Any]:
        mean, std = info.mean_std(s_mag)
        return {
            "format": T.CHECKPOINT_FORMAT,
            "stage": stage,
            "arch": config["arch"],
            "num_classes": info.num_classes,
            "classes": list(info.classes),
            "mag": s_mag,
            "tile_px": int(info.tile_px.get(s_mag, 0)),
            "normalization": {"mean": list(mean), "std": list(std)},
            "dataset": info.url,
            "train_splits": list(config["train_splits"]),
            "teacher": None
            if supervised
            else {
                "checkpoint": tmeta["checkpoint"],
                "arch": tmeta["arch"],
                "mag": t_mag,
                "classes": list(tmeta["classes"]),
            },
            "loss": {"label_smoothing": loss_cfg["label_smoothing"]}
            if supervised
            else {k: v for k, v in loss_cfg.items() if k != "label_smoothing"},
            "state_dict": {k: v.detach().cpu() for k, v in student.state_dict().items()},
        }

    def trainer_payload(st: T.TrainState) -> dict[str, Any]:
        out: dict[str, Any] = {
            "optimizer": optimizer.state_dict(),
            "state": st.to_dict(),
            "config": {k: v for k, v in config.items() if k != "dataset"},
            "teacher_val": dict(teacher_val),
        }
        if distill_loss is not None:
            out["loss"] = {k: v.detach().cpu() for k, v in distill_loss.state_dict().items()}
        return out

    try:
        T.fit(
            env=env,
            state=state,
            epochs=config["epochs"],
            train_epoch=train_epoch,
            validate=validate,
            model_payload=model_payload,
            trainer_payload=trainer_payload,
            tracer=tracer,
            log=log,
        )
    finally:
        train_loader.close()
        val_loader.close()


def _score_teacher(
    teacher: FrozenTeacher,
    info: Any,
    config: Mapping[str, Any],
    env: Any,
    common: Mapping[str, Any],
    log: Callable[[str], None],
) -> dict[str, float]:
    """The teacher's accuracy, macro F1 and loss on the validation split at its magnification
    (all ranks), once per run: reported with every epoch as ``teacher_val_*`` for comparison."""
    from resdistill import data as D
    from resdistill import train_loop as T

    loader = D.make_loader(
        info,
        [config["val_split"]],
        [config["teacher_mag"]],
        batch_size=config["eval_batch_size"],
        train=False,
        labelled_only=True,
        **common,
    )
    try:
        scored = T.evaluate(teacher, loader, env, info.num_classes, prefix="teacher_val_")
    finally:
        loader.close()
    out = {k: v for k, v in scored.items() if k.endswith(("accuracy", "macro_f1"))}
    if env.is_main:
        log(
            f"teacher on {config['val_split']} at {config['teacher_mag']}: accuracy "
            f"{out['teacher_val_accuracy']:.4f}  macro F1 {out['teacher_val_macro_f1']:.4f}"
        )
    return out
