"""One declaration per option: a config field that carries its default, help text and flag.

Every command's options are fields of a frozen dataclass declared with :func:`opt`::

    batch_size: int = opt(64, "per-worker batch size", tune="yes")

The CLI layer (:mod:`resdistill.commands.generate`) turns those fields into command-line
options; ``--config FILE.yaml`` and a config built in Python read the same fields, so a default
or a help line is written once. This module imports nothing but the standard library: configs
stay importable by CPU-only sharding nodes and by ``resdistill --help`` without torch or Ray.

Field metadata (all optional):

* ``help``: one plain-text line (no markup), shown by ``--help``.
* ``flag``: the option's name when it is not ``--<field-name-with-dashes>``.
* ``choices``: the allowed values (validated by the config, shown by ``--help``).
* ``parse``: ``str -> value`` for a command-line text (ValueError's message is shown with the
  flag); lists of numbers or names default to comma-separated text.
* ``metavar``, ``const`` (with ``nargs="?"``), ``positional``, ``required``.
* ``repeat``: a tuple field whose flag may be given several times, one item each (``--space A
  --space B``), never split at commas.
* ``cli``: False for values the program fills in (never a flag, still in the YAML).
* ``tune``: ``"pbt"`` or ``"yes"``: Ray Tune may vary it (see :func:`resdistill.config.tunable`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

from resdistill.errors import UsageError


class ConfigError(UsageError):
    """An invalid option value; the message names the flag (``--batch-size must be ...``)."""


def opt(
    default: Any = MISSING,
    help: str = "",  # noqa: A002 - the command-line word
    *,
    flag: str | None = None,
    choices: tuple[Any, ...] | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    const: Any = MISSING,
    positional: bool = False,
    required: bool = False,
    repeat: bool = False,
    cli: bool = True,
    tune: str | None = None,
) -> Any:
    """A dataclass ``field`` with its option metadata (see the module docstring)."""
    meta: dict[str, Any] = {"help": help, "cli": cli}
    for key, value in (("flag", flag), ("choices", choices), ("parse", parse),
                       ("metavar", metavar), ("tune", tune)):  # fmt: skip
        if value is not None:
            meta[key] = value
    if const is not MISSING:
        meta["const"] = const
    if positional:
        meta["positional"] = True
    if required:
        meta["required"] = True
    if repeat:
        meta["repeat"] = True
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple or a Mapping default, not a mutable one")
    return dataclasses.field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    """The option's command-line name: ``metadata["flag"]`` or ``--field-name``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's fields (``from __future__`` annotations)."""
    return typing.get_type_hints(cls)


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; any other type -> ``(type, False)``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), True
    return tp, False


def dataclass_of(tp: Any) -> type | None:
    """The dataclass a field holds (``Section`` or ``Section | None``), else None."""
    inner, _ = unwrap_optional(tp)
    return inner if isinstance(inner, type) and is_dataclass(inner) else None


def check(ok: bool, flag: str, message: str) -> None:
    """Raise :class:`ConfigError` ``"<flag> <message>"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{flag} {message}")


def check_choice(cls: type, obj: Any, name: str) -> None:
    """Refuse a value of field ``name`` outside its declared ``choices``."""
    f = next(f for f in fields(cls) if f.name == name)
    allowed = f.metadata.get("choices", ())
    value = getattr(obj, name)
    check(value in allowed, flag_of(f), f"must be one of {', '.join(map(str, allowed))}, "
          f"got {value!r}")  # fmt: skip


def to_plain(value: Any) -> Any:
    """Nested dataclasses/Mappings/tuples as plain dicts/lists/scalars (YAML/JSON-safe)."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value


def from_plain(cls: type, doc: Mapping[str, Any] | None, *, strict: bool = False) -> Any:
    """Inverse of :func:`to_plain`: ``cls(**doc)`` with nested sections built recursively and
    lists turned into tuples where the field is a tuple. Missing keys take their defaults;
    unknown keys are ignored, or refused with ``strict`` (a config file's typo)."""
    if doc is None:
        return None
    hints = field_types(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(doc) - names)
    if strict and unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)} in {cls.__name__}; known: "
            f"{', '.join(sorted(names))}"
        )
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in doc:
            continue
        value = doc[f.name]
        sub = dataclass_of(hints[f.name])
        if sub is not None and value is not None and not is_dataclass(value):
            value = from_plain(sub, value, strict=strict)
        elif isinstance(value, list) and "tuple" in str(hints[f.name]):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)
