"""The options of ``resdistill export``: one typed, validated :class:`ExportConfig`.

The CLI is generated from these fields (:mod:`resdistill.commands.export`);
:func:`resdistill.export.files.export_checkpoint` takes the config. No ``config.yaml`` is written:
the output is one file meant to travel alone, and its metadata document already records what
the config holds (the source checkpoint, the resdistill version; the file is its format).
Whether ``--format onnx``'s optional packages are installed is the exporter's check, not the
config's (a config file stays readable where they are missing).
"""

from __future__ import annotations

from dataclasses import dataclass

from resdistill.config import MODEL_FORMS
from resdistill.export import FORMATS
from resdistill.fields import ConfigError, opt

__all__ = ["ExportConfig"]


@dataclass(frozen=True)
class ExportConfig:
    """Which checkpoint is exported, in which format, to which file."""

    checkpoint: str = opt(help=f"the model: {MODEL_FORMS}", positional=True, required=True,
                          metavar="CKPT")  # fmt: skip
    format: str = opt("torchscript", "file format", choices=tuple(FORMATS),
                      metavar="|".join(FORMATS))  # fmt: skip
    out: str | None = opt(
        None, "output file: a path or s3://bucket/key (default: <stage>-<magnification>"
        f"{FORMATS['torchscript']} or {FORMATS['onnx']} in the current folder)")  # fmt: skip

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown --format {self.format!r}: choose {' or '.join(FORMATS)}")
