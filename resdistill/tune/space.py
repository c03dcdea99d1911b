"""The search space: domains, their text forms, space files, the default spaces and the checks.

A domain is written ``loguniform:LOW:HIGH``, ``uniform:LOW:HIGH``, ``randint:LOW:HIGH`` (HIGH
exclusive), ``choice:A,B,C``, ``grid:A,B,C`` (every value, times ``--num-samples``) or a plain
value (fixed). A space is the stage's :data:`DEFAULT_SPACE` (unless ``--no-default-space``), then
``--space-file`` (JSON or YAML ``{name: domain}`` or ``{"space": {...}}``), then ``--space``
entries (:class:`~resdistill.tune.config.TuneConfig`'s ``default_space``, ``space_file``,
``space``); the names are those :func:`resdistill.tune.stage.settings` lists for the stage.

Distillation trials ranked label-free (``--select distill-loss``, their default) compare
``val_distill_loss``, a number only comparable between trials that minimise the same objective:
the settings that define it (:func:`objective_settings`) may be fixed but never varied (the
default space leaves them out). Varied, the ranking would favour whatever shrinks the loss, not
the student: a smaller weight, no feature term.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from resdistill.config import (
    STAGE_DISTILL,
    STAGE_SUPERVISED,
    STAGE_TEACHER,
    TrainConfig,
    tunable,
)
from resdistill.errors import UsageError
from resdistill.train.selection import resolve_rule
from resdistill.tune.config import TuneConfig
from resdistill.tune.stage import apply_hparams, canonical, settings

_SUPERVISED_SPACE = {
    "lr": "loguniform:1e-4:3e-3",
    "weight_decay": "loguniform:1e-6:1e-3",
    "label_smoothing": "choice:0,0.1",
}
#: What each stage tunes unless told otherwise.
DEFAULT_SPACE: dict[str, dict[str, str]] = {
    STAGE_DISTILL: {
        "lr": "loguniform:1e-4:3e-3",
        "weight_decay": "loguniform:1e-6:1e-3",
        "temperature": "choice:1,2,4,8",
        "kd_weight": "uniform:0.25:2",
        "feature_weight": "uniform:0:2",
    },
    STAGE_TEACHER: _SUPERVISED_SPACE,
    STAGE_SUPERVISED: _SUPERVISED_SPACE,
}
KINDS = ("loguniform", "uniform", "randint", "choice", "grid")


@dataclass(frozen=True)
class Domain:
    """One hyperparameter's domain: ``kind`` in :data:`KINDS` or ``fixed``, and its values
    (``(low, high)`` for ranges, the options for ``choice``/``grid``, one value for ``fixed``)."""

    kind: str
    values: tuple[Any, ...]

    def to_tune(self) -> Any:
        """The ``ray.tune`` search domain (a plain value for ``fixed``)."""
        from ray import tune

        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "randint":
            return tune.randint(*self.values)
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def candidates(self) -> tuple[Any, ...]:
        """Values that bound what a trial can draw: the options, or a range's two ends (a
        randint's largest value is ``HIGH - 1``)."""
        if self.kind == "randint":
            return (self.values[0], self.values[1] - 1)
        return self.values

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(self.values[0])
        sep = "," if self.kind in ("choice", "grid") else ":"
        return f"{self.kind}:{sep.join(str(v) for v in self.values)}"


def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"1e-3"`` -> 0.001, ``"true"`` -> True, anything else the stripped text."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def _parsed(values: Any) -> list[Any]:
    return [parse_value(v) if isinstance(v, str) else v for v in values]


def parse_domain(name: str, spec: Any) -> Domain:
    """A :class:`Domain` from ``"loguniform:1e-4:1e-2"``, ``"choice:1,2,4"``, a plain value, a
    list (a choice) or a mapping ``{"type": kind, "values": [...]}`` / ``{"type": kind, "low":
    a, "high": b}``. Raises :class:`UsageError` naming ``name`` when it is malformed."""
    if isinstance(spec, Mapping):
        kind = str(spec.get("type", "")).lower()
        if "values" in spec:
            values = list(spec["values"])
        elif "low" in spec and "high" in spec:
            values = [spec["low"], spec["high"]]
        elif "value" in spec:
            kind, values = "fixed", [spec["value"]]
        else:
            raise UsageError(f"search space {name!r}: give 'values', 'low'/'high' or 'value'")
        return _check_domain(name, kind or "choice", _parsed(values))
    if isinstance(spec, list | tuple):
        return _check_domain(name, "choice", _parsed(spec))
    if not isinstance(spec, str):
        return Domain("fixed", (spec,))
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS:
        return Domain("fixed", (parse_value(spec),))
    sep_values = "," if kind in ("choice", "grid") else ":"
    values = [parse_value(v) for v in rest.split(sep_values) if v.strip()]
    return _check_domain(name, kind, values)


def _check_domain(name: str, kind: str, values: list[Any]) -> Domain:
    if kind == "fixed":
        if len(values) != 1:
            raise UsageError(f"search space {name!r}: a fixed value is one value")
        return Domain(kind, tuple(values))
    if kind not in KINDS:
        raise UsageError(f"search space {name!r}: unknown domain {kind!r} ({', '.join(KINDS)})")
    if kind in ("choice", "grid"):
        if not values:
            raise UsageError(f"search space {name!r}: {kind} needs at least one value")
        return Domain(kind, tuple(values))
    if len(values) != 2 or not all(isinstance(v, int | float) for v in values):
        raise UsageError(f"search space {name!r}: {kind} needs LOW:HIGH numbers, got {values}")
    low, high = values
    if not low < high:
        raise UsageError(f"search space {name!r}: {kind} needs LOW < HIGH, got {low}:{high}")
    if kind == "loguniform" and low <= 0:
        raise UsageError(f"search space {name!r}: loguniform needs LOW > 0")
    if kind == "randint":
        return Domain(kind, (int(low), int(high)))
    return Domain(kind, (float(low), float(high)))


def split_space_arg(text: str) -> list[tuple[str, str]]:
    """``"lr=loguniform:1e-4:1e-2,temperature=choice:1,2,4"`` -> ``[("lr", "loguniform:..."),
    ("temperature", "choice:1,2,4")]``: a comma starts a new entry only when ``name=`` follows."""
    entries: list[tuple[str, str]] = []
    for part in text.split(","):
        head, eq, tail = part.partition("=")
        if eq and head.strip().isidentifier():
            entries.append((head.strip(), tail))
        elif entries:
            name, spec = entries[-1]
            entries[-1] = (name, f"{spec},{part}")
        else:
            raise UsageError(f"--space: expected NAME=DOMAIN, got {part!r}")
    return entries


def load_space_file(path: str) -> dict[str, Any]:
    """A JSON or YAML mapping ``{name: domain}`` (or ``{"space": {...}}``) from a local file or
    ``s3://`` URL."""
    from sharding.storage import open_storage

    url = os.fspath(path)
    parent, _, leaf = url.rstrip("/").rpartition("/")
    try:
        text = open_storage(parent or ".").read_bytes(leaf).decode()
    except FileNotFoundError:
        raise UsageError(f"--space-file {url}: no such file") from None
    try:
        if url.endswith((".yaml", ".yml")):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one line
        raise UsageError(f"--space-file {url}: cannot parse: {exc}".splitlines()[0]) from None
    if isinstance(doc, Mapping) and isinstance(doc.get("space"), Mapping):
        doc = doc["space"]
    if not isinstance(doc, Mapping):
        raise UsageError(f"--space-file {url}: expected a mapping of name to domain")
    return dict(doc)


def objective_settings() -> frozenset[str]:
    """The settings that define the distillation loss itself (temperature and the terms'
    weights): the tunable settings only distillation has."""
    return frozenset(tunable(STAGE_DISTILL)) - frozenset(tunable(STAGE_SUPERVISED))


def build_space(cfg: TuneConfig, stage: str | None = None) -> dict[str, Domain]:
    """The search space for ``stage`` (default: the trials'): its default space (unless
    ``--no-default-space``), then ``--space-file``, then ``--space``; each later entry replaces an
    earlier one of its name. Raises :class:`UsageError` for a name the stage cannot tune, a
    malformed domain, two names of one setting (``mag`` and ``student_mag``), an empty space, or
    an :func:`objective_settings` entry varied while trials rank by ``val_distill_loss`` (see the
    module docstring; the default space then leaves those out)."""
    stage = stage or cfg.stage
    allowed = settings(stage)
    by_loss = stage == STAGE_DISTILL and resolve_rule(cfg.train) == "distill-loss"
    fixed_objective = objective_settings() if by_loss else frozenset()
    raw: dict[str, Any] = {}
    if cfg.default_space:
        raw = {k: v for k, v in DEFAULT_SPACE[stage].items() if k not in fixed_objective}
    if cfg.space_file:
        raw.update(load_space_file(cfg.space_file))
    for text in cfg.space:
        raw.update(dict(split_space_arg(text)))
    space: dict[str, Domain] = {}
    for name, spec in raw.items():
        if name not in allowed:
            raise UsageError(
                f"cannot tune {name!r} for the {stage} stage: choose from {', '.join(allowed)}"
            )
        space[name] = parse_domain(name, spec)
    seen: dict[str, str] = {}
    for name in space:
        other = seen.setdefault(canonical(name), name)
        if other != name:
            raise UsageError(f"search space: {other!r} and {name!r} name the same setting")
    varied = [
        name
        for name, dom in space.items()
        if name in fixed_objective and len(set(dom.candidates())) > 1
    ]
    if varied:
        raise UsageError(
            f"search space {', '.join(map(repr, varied))}: val_distill_loss (--select "
            "distill-loss, label-free) only compares trials with the same distillation loss: fix "
            "it (NAME=VALUE) or rank by labels with --select metric"
        )
    if not space:
        raise UsageError("the search space is empty: pass --space NAME=DOMAIN")
    return space


def check_space(space: Mapping[str, Domain], base: TrainConfig, cfg: TuneConfig) -> None:
    """Every value a domain can take must give a trial the dataset can serve: each candidate
    (:meth:`Domain.candidates`) is set on ``base`` as a trial sets it
    (:func:`resdistill.tune.stage.apply_hparams`). Raises :class:`UsageError` naming the entry."""
    opts = {"workers": cfg.train.run.workers,
            "fixed_steps": cfg.train.data.steps_per_epoch is not None}  # fmt: skip
    for name, dom in space.items():
        if canonical(name) == "mag" and dom.kind not in ("choice", "grid", "fixed"):
            raise UsageError(f"search space {name!r}: use choice/grid of magnifications")
        for value in dom.candidates():
            if name == "batch_size" and (not isinstance(value, int) or value < 1):
                raise UsageError(f"search space {name!r}: {value!r} is not a positive integer")
            try:
                apply_hparams(base, {name: value}, opts)
            except ValueError as exc:
                raise UsageError(f"search space {name!r}: {exc}") from None
