"""The command line generated from typed configs: one declaration per option.

A command is a :class:`CommandSpec`: its config class (a frozen dataclass whose fields are
declared with :func:`resdistill.fields.opt`), plain-text help and examples, and the few things
that differ per command (fixed values, hidden fields, a renamed flag). :func:`add_arguments`
turns every command-line field into an option (flat names such as ``--batch-size``, one argument
group per config section) plus ``--config FILE.yaml`` and ``--print-config``; :func:`resolve`
builds the config from, lowest first: the fields' defaults, the YAML file, the flags given,
then the spec's fixed values. Validation is the config's own (its messages name the flag).

Why our own generator rather than jsonargparse or tyro: both spell nested fields
``--data.batch_size``, which would rename every documented flag; ours keeps the flat names,
stays under 300 lines, and needs nothing beyond argparse and PyYAML (already installed by Ray).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, NoReturn

from resdistill.fields import (
    ConfigError,
    dataclass_of,
    field_types,
    flag_of,
    from_plain,
    to_plain,
    unwrap_optional,
)

_DEST = "cfg:"  # argparse dest prefix of a config field: "cfg:data.batch_size"


@dataclass(frozen=True)
class Flag:
    """A command's change to one field's option (a clearer name, or a required flag)."""

    flag: str | None = None
    help: str | None = None
    required: bool | None = None


@dataclass(frozen=True)
class Switch:
    """A command-only switch that sets a config path to a constant (``--supervised``)."""

    flag: str
    path: str
    const: Any
    help: str


@dataclass(frozen=True)
class CommandSpec:
    """Everything the CLI needs to know about one command besides its config's fields."""

    name: str  # "teacher": ``resdistill teacher``
    config: type  # the config dataclass
    summary: str  # one line for ``resdistill --help``
    description: str = ""  # plain text, paragraphs separated by blank lines
    examples: tuple[str, ...] = ()  # shell lines, each spelt ``resdistill <command> ...``
    defaults: Mapping[str, Any] = field(default_factory=dict)  # dotted path -> preset value
    fixed: Mapping[str, Any] = field(default_factory=dict)  # dotted path -> value, always set
    hidden: frozenset[str] = frozenset()  # dotted paths (or section prefixes) not offered
    flags: Mapping[str, Flag] = field(default_factory=dict)  # dotted path -> change
    switches: tuple[Switch, ...] = ()
    titles: Mapping[str, str] = field(default_factory=dict)  # section path -> group title


@dataclass(frozen=True)
class Leaf:
    """One command-line field: its dotted path, dataclass field, type and option name."""

    path: str
    field: dataclasses.Field
    type: Any
    flag: str
    help: str
    required: bool


def leaves(spec: CommandSpec) -> Iterator[Leaf]:
    """The options ``spec`` offers, in declaration order (sections recursively)."""
    yield from _walk(spec, spec.config, "")


def _walk(spec: CommandSpec, cls: type, prefix: str) -> Iterator[Leaf]:
    hints = field_types(cls)
    for f in fields(cls):
        path = prefix + f.name
        if not f.metadata.get("cli", True) or _hidden(spec, path):
            continue
        sub = dataclass_of(hints[f.name])
        if sub is not None:
            yield from _walk(spec, sub, path + ".")
            continue
        change = spec.flags.get(path, Flag())
        required = f.metadata.get("required", False) if change.required is None else change.required
        yield Leaf(path, f, hints[f.name], change.flag or flag_of(f),
                   change.help or f.metadata.get("help", ""), required)  # fmt: skip


def _hidden(spec: CommandSpec, path: str) -> bool:
    return any(path == h or path.startswith(h + ".") for h in spec.hidden)


class OneLineParser(argparse.ArgumentParser):
    """Option errors as one line, ``resdistill teacher: error: --epochs must be at least 1
    (see --help)``, exit status 2: the usage block would bury the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Plain text at most 100 columns wide; descriptions and examples keep their lines."""

    def __init__(self, prog: str) -> None:
        width = min(100, shutil.get_terminal_size((100, 24)).columns)
        super().__init__(prog, width=width, max_help_position=32)


def build_parser(spec: CommandSpec, prog: str | None = None) -> argparse.ArgumentParser:
    """A stand-alone parser for ``spec`` (``python -m resdistill.<command>``)."""
    parser = OneLineParser(prog=prog or f"resdistill {spec.name}")
    return add_arguments(parser, spec)


def add_arguments(parser: argparse.ArgumentParser, spec: CommandSpec) -> argparse.ArgumentParser:
    """Add ``spec``'s options, ``--config`` and ``--print-config`` to ``parser``."""
    parser.formatter_class = HelpFormatter
    parser.usage = "%(prog)s [options]" + "".join(
        " " + _positional_metavar(leaf) + (" ..." if _is_list(leaf.type) else "")
        for leaf in leaves(spec) if leaf.field.metadata.get("positional"))  # fmt: skip
    parser.description = spec.summary + (f"\n\n{spec.description.strip()}" if spec.description
                                         else "")  # fmt: skip
    if spec.examples:
        parser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in spec.examples)
    groups: dict[str, Any] = {}
    for leaf in leaves(spec):
        section = leaf.path.rpartition(".")[0]
        if section not in groups:
            title = spec.titles.get(section, section.replace(".", " ") or "options")
            groups[section] = parser if not section else parser.add_argument_group(title)
        _add(groups[section], leaf, _default_shown(spec, leaf))
    g = parser.add_argument_group("configuration")
    for sw in spec.switches:
        g.add_argument(sw.flag, dest=_DEST + "switch:" + sw.flag, action="store_true",
                       default=argparse.SUPPRESS, help=sw.help)  # fmt: skip
    g.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="read options from a YAML file (a run's config.yaml reproduces that "
                   "run); flags given on the command line override it")  # fmt: skip
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as YAML and exit")  # fmt: skip
    return parser


def _add(group: Any, leaf: Leaf, shown: Any) -> None:
    meta = leaf.field.metadata
    kind, _ = unwrap_optional(leaf.type)
    text = leaf.help
    if shown not in (None, "", (), MISSING) and "(default" not in text:
        text += f" (default: {show_value(shown)})"
    kw: dict[str, Any] = {"dest": _DEST + leaf.path, "default": argparse.SUPPRESS, "help": text}
    choices = [c for c in meta.get("choices", ()) if c != ""]
    kw["metavar"] = meta.get("metavar") or (
        "{" + ",".join(map(str, choices)) + "}" if choices else _METAVARS.get(kind, "TEXT")
    )
    if kind is bool:
        kw.pop("metavar", None)
        group.add_argument(leaf.flag, action=argparse.BooleanOptionalAction, **kw)
        return
    kw["type"] = _converter(leaf, kind)
    if meta.get("repeat"):  # each use adds one item (--space A --space B), never split at commas
        kw.update(action="append", type=_converter(leaf, _item_type(kind)))
    if "const" in meta:
        kw.update(nargs="?", const=meta["const"])
    if meta.get("positional"):  # optional here: a --config file may give it (resolve checks)
        if _is_list(kind):  # one command-line word per item, never split at commas
            kw["type"] = _converter(leaf, _item_type(kind), parse=_item_type(kind))
        kw.pop("dest")
        kw.update(nargs="*" if _is_list(kind) else "?", metavar=_positional_metavar(leaf))
        group.add_argument(_DEST + leaf.path, **kw)
        return
    group.add_argument(leaf.flag, **kw)


_METAVARS = {int: "N", float: "X"}
_EXPECTED = {int: "a whole number", float: "a number"}


def _is_list(kind: Any) -> bool:
    return "tuple" in str(kind)


def _item_type(kind: Any) -> type:
    return float if "float" in str(kind) else int if "int" in str(kind) else str


def _positional_metavar(leaf: Leaf) -> str:
    return leaf.field.metadata.get("metavar") or leaf.field.name.upper()


def _converter(leaf: Leaf, kind: Any, parse: Callable[[str], Any] | None = None
               ) -> Callable[[str], Any]:  # fmt: skip
    parse = parse or leaf.field.metadata.get("parse")
    if parse is None:
        parse = _list_parser(kind) if _is_list(kind) else kind

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (TypeError, ValueError) as exc:
            expected = _EXPECTED.get(parse)
            message = f"expected {expected}, got {text!r}" if expected else str(exc)
            raise argparse.ArgumentTypeError(message or f"cannot read {text!r}") from None

    convert.__name__ = getattr(kind, "__name__", "value")  # argparse's "invalid int value"
    return convert


def _list_parser(kind: Any) -> Callable[[str], tuple[Any, ...]]:
    item = _item_type(kind)
    return lambda text: tuple(item(v.strip()) for v in text.split(",") if v.strip())


def _default_shown(spec: CommandSpec, leaf: Leaf) -> Any:
    for preset in (spec.fixed, spec.defaults):
        if leaf.path in preset:
            return preset[leaf.path]
    return leaf.field.default


def show_value(value: Any) -> str:
    """A default as ``--help`` shows it (lists comma-joined, numbers short, on/off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple | list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def resolve(parser: argparse.ArgumentParser, spec: CommandSpec, args: argparse.Namespace) -> Any:
    """The config ``args`` ask for (defaults < ``--config`` file < flags < fixed values).
    Bad values exit 2 through ``parser.error`` with the config's one-line message."""
    from resdistill.run_config import read_config_file

    doc: dict[str, Any] = {}
    for path, value in spec.defaults.items():
        _set(doc, path, value)
    try:
        if getattr(args, "config", None):
            for path, value in _flatten(read_config_file(args.config)):
                _set(doc, path, value)
    except (OSError, ValueError) as exc:
        parser.error(f"--config {args.config}: {exc}")
    given = {k[len(_DEST) :]: v for k, v in vars(args).items() if k.startswith(_DEST)}
    for key, value in given.items():
        if key.startswith("switch:"):
            sw = next(s for s in spec.switches if s.flag == key[len("switch:") :])
            _set(doc, sw.path, sw.const)
        else:
            _set(doc, key, value)
    for path, value in spec.fixed.items():
        _set(doc, path, value)
    missing = [
        _positional_metavar(leaf) if leaf.field.metadata.get("positional") else leaf.flag
        for leaf in leaves(spec) if leaf.required and _get(doc, leaf.path) in (None, (), [])
    ]  # fmt: skip
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    try:
        return from_plain(spec.config, doc, strict=True)
    except ConfigError as exc:
        parser.error(str(exc))
    except TypeError as exc:  # a required field the command line cannot give
        parser.error(str(exc))


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *heads, last = path.split(".")
    for head in heads:
        inner = doc.get(head)
        if not isinstance(inner, dict):
            inner = doc[head] = {}
        doc = inner
    doc[last] = value


def _flatten(doc: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in doc.items():
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield prefix + str(key), value


def _get(doc: Mapping[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(doc, Mapping) or part not in doc:
            return None
        doc = doc[part]
    return doc


def print_config(cfg: Any) -> None:
    """``--print-config``: the resolved config as YAML on stdout."""
    from resdistill.run_config import dump_yaml

    doc = to_plain(cfg)
    for f in fields(cfg):  # sections the program fills in (a training run's plan)
        if not f.metadata.get("cli", True) and doc.get(f.name) is None:
            doc.pop(f.name)
    sys.stdout.write(dump_yaml(doc))


def parse(spec: CommandSpec, argv: list[str] | None = None, prog: str | None = None) -> Any:
    """The config of ``argv`` for ``spec`` (``--print-config`` prints it and exits 0)."""
    parser = build_parser(spec, prog)
    args = parser.parse_args(argv)
    cfg = resolve(parser, spec, args)
    if args.print_config:
        print_config(cfg)
        raise SystemExit(0)
    return cfg


def main(spec: CommandSpec, run: Callable[[Any], int], argv: list[str] | None = None,
         prog: str | None = None) -> int:  # fmt: skip
    """``python -m resdistill.<command>``: parse ``argv`` into a config, ``run`` it; 130 on
    Ctrl-C."""
    try:
        cfg = parse(spec, argv, prog)
    except SystemExit as exc:  # --help, --print-config, or an option error (printed)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(run(cfg) or 0)
    except KeyboardInterrupt:
        return 130
