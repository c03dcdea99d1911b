"""Overrides of a study cell's :class:`~resdistill.config.TrainConfig`, applied last.

An override is a mapping nested as the config (``{"loss": {"temperature": 4.0}}``).
:func:`train_options` reads one from the training commands' flags (the text of ``resdistill
study --student-args '--temperature 4 --no-flips'``): each flag is found on the TrainConfig field
that declares it, and its text read by that field's own parser, so the options mean what they
mean to ``resdistill teacher`` / ``distill``. :func:`apply_overrides` sets them on a cell's config.
"""

from __future__ import annotations

import functools
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import Field, fields
from typing import Any

from resdistill.config import STAGE_DISTILL, DataConfig, TeacherRef, TrainConfig
from resdistill.fields import (
    ConfigError,
    dataclass_of,
    field_types,
    flag_of,
    from_plain,
    unwrap_optional,
)


def _leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, Field, Any]]:
    hints = field_types(cls)
    for f in fields(cls):
        if not f.metadata.get("cli", True):
            continue
        sub = dataclass_of(hints[f.name])
        if sub is not None:
            yield from _leaves(sub, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, hints[f.name]


@functools.cache
def _flags() -> dict[str, tuple[str, Field, Any]]:
    """``{"--jitter": ("data.jitter", field, type), ...}`` of every TrainConfig option."""
    return {flag_of(f): (path, f, tp) for path, f, tp in _leaves(TrainConfig)}


def train_options(text: str) -> dict[str, Any]:
    """``"--jitter 0.5,0.5,0.5,0.2 --no-flips"`` -> ``{"data": {"jitter": (0.5, 0.5, 0.5, 0.2),
    "flips": False}}``. Booleans are ``--x`` / ``--no-x``; ``--compile`` alone takes its
    constant; ``--flag=value`` works too. ValueError naming an unknown flag or a bad value."""
    flags, tokens = _flags(), shlex.split(text)
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        name, eq, given = tokens[i].partition("=")
        i += 1
        negated = name.startswith("--no-") and _is_bool(flags.get("--" + name[5:]))
        key = "--" + name[5:] if negated else name
        if key not in flags:
            raise ValueError(f"unknown option {tokens[i - 1]!r} (the training commands' flags)")
        path, f, tp = flags[key]
        kind, _ = unwrap_optional(tp)
        if kind is bool:
            if eq:
                raise ValueError(f"{name} takes no value")
            value: Any = not negated
        elif eq:
            value = _read(f, kind, name, given)
        elif "const" in f.metadata and (i == len(tokens) or tokens[i].startswith("--")):
            value = f.metadata["const"]
        elif i < len(tokens):
            value = _read(f, kind, name, tokens[i])
            i += 1
        else:
            raise ValueError(f"{name} needs a value")
        _set(out, path, value)
    return out


def _is_bool(leaf: tuple[str, Field, Any] | None) -> bool:
    return leaf is not None and unwrap_optional(leaf[2])[0] is bool


def _read(f: Field, kind: Any, flag: str, text: str) -> Any:
    """``text`` as ``f``'s value: its declared parser, a comma list for a tuple, else its type."""
    parse = f.metadata.get("parse")
    if parse is None and "tuple" in str(kind):
        item = float if "float" in str(kind) else int if "int" in str(kind) else str
        parse = lambda t: tuple(item(v.strip()) for v in t.split(",") if v.strip())  # noqa: E731
    try:
        return (parse or kind)(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{flag}: {exc or f'cannot read {text!r}'}") from None


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *heads, last = path.split(".")
    for head in heads:
        doc = doc.setdefault(head, {})
    doc[last] = value


def _merge(doc: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``doc`` with ``overrides`` set recursively; a section the cell lacks (a baseline's
    teacher) is left out."""
    out = dict(doc)
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            if out.get(key) is None and key in doc:
                continue
            out[key] = _merge(out.get(key) or {}, value)
        else:
            out[key] = value
    return out


def apply_overrides(cfg: TrainConfig, overrides: Mapping[str, Any] | None) -> TrainConfig:
    """``cfg`` with ``overrides`` set (validated as any config; unknown names refused). The
    stage and the plan are the study's, never overridden."""
    if not overrides:
        return cfg
    fixed = sorted({"stage", "plan"} & set(overrides))
    if fixed:
        raise ConfigError(f"a cell's {', '.join(fixed)} cannot be overridden")
    try:
        return from_plain(TrainConfig, _merge(cfg.to_dict(), overrides), strict=True)
    except TypeError as exc:  # a section given without its required field
        raise ConfigError(str(exc)) from None


def check_overrides(overrides: Mapping[str, Any] | None, stage: str, flag: str) -> None:
    """Refuse overrides no cell of ``stage`` could take, before any run (ConfigError naming
    ``flag``)."""
    if not overrides:
        return
    teacher = TeacherRef(checkpoint="-") if stage == STAGE_DISTILL else None
    probe = TrainConfig(stage, DataConfig(url="-"), teacher=teacher)
    try:
        apply_overrides(probe, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
