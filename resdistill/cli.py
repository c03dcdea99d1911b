"""The ``resdistill`` command: one subcommand per module, heavy imports inside each command.

Each subcommand module exposes ``SPEC`` (a :class:`~resdistill.commands.generate.CommandSpec`:
its typed config and help; the options are generated from the config's fields) and
``run(config) -> int`` (the exit code: 0 success, 1 finished with skipped input, 2 unusable
input or options).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from resdistill.commands import generate

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("resdistill.commands.demo", "run the pipeline end to end on synthetic slides"),
    "synth": ("resdistill.commands.synth", "write synthetic H&E-like whole-slide images"),
    "shard": ("resdistill.commands.shard", "tile slides at several magnifications into shards"),
    "teacher": ("resdistill.commands.teacher", "train the high-magnification teacher on Ray Train"),
    "distill": (
        "resdistill.commands.distill",
        "distill a low-magnification student from the teacher",
    ),
    "evaluate": (
        "resdistill.commands.evaluate",
        "score checkpoints on a split: metrics with CIs, compute table, plots",
    ),
    "predict": (
        "resdistill.commands.predict",
        "classify slides and draw tile-probability heatmaps",
    ),
    "tune": (
        "resdistill.commands.tune",
        "tune distillation or the teacher with Ray Tune (ASHA/PBT)",
    ),
    "export": (
        "resdistill.commands.export",
        "write a checkpoint as one TorchScript or ONNX file with its normalisation and classes",
    ),
    "study": ("resdistill.commands.study", "check the paper's three claims: a grid on Ray Tune"),
    "teacher-targets": (
        "resdistill.commands.teacher_targets",
        "run the frozen teacher once and cache its targets for distillation",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    from resdistill import __version__

    parser = generate.OneLineParser(
        prog="resdistill",
        formatter_class=generate.HelpFormatter,
        description="Resolution distillation for histology: shard slides, train a teacher, "
        "distill a low-magnification student.",
    )
    parser.add_argument("--version", action="version", version=f"resdistill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        spec = getattr(mod, "SPEC", None)
        p = sub.add_parser(name, help=help_text)
        if spec is not None:
            generate.add_arguments(p, spec)
        else:
            p.description = (mod.__doc__ or help_text).strip()
            p.formatter_class = generate.HelpFormatter
            mod.add_arguments(p)
        p.set_defaults(_module=mod, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mod = args._module
    spec = getattr(mod, "SPEC", None)
    if spec is not None:
        cfg = generate.resolve(args._parser, spec, args)
        if args.print_config:
            generate.print_config(cfg)
            return 0
        args = cfg
    try:
        return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        print(
            "interrupted: published shards are kept; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
