"""The options of ``resdistill synth``: one synthetic slide set.

:class:`SynthConfig` declares every option once (default, help, flag) and validates itself; the
command line is generated from it, and :func:`sharding.synthetic.slides.synthesize` takes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from resdistill.fields import ConfigError, check, opt
from sharding.synthetic.cohorts import COHORTS, Cohort, cohort_named


def parse_size_um(text: str) -> tuple[float, float]:
    """``"4000x3000"`` -> ``(4000.0, 3000.0)``: a slide's width and height in micrometres."""
    try:
        w, h = (float(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"takes WxH in micrometres, got {text!r}") from None
    return w, h


_KINDS = "; ".join(
    f"{c.name}: {c.models} ({c.slides} slides, {100 * c.labeled_fraction:.0f} percent labelled)"
    for c in COHORTS.values()
)


@dataclass(frozen=True)
class SynthConfig:
    """A synthetic slide set: where it goes, which cohort, how many slides, how big."""

    out: str = opt(help="output folder", positional=True, required=True)
    cohort: str = opt(
        "default", f"kind of slide set, or several joined by '+' (e.g. sites+subtle): {_KINDS}"
    )
    slides: int | None = opt(None, "number of slides (default: the cohort's)")
    seed: int = opt(0, "random seed: the same options give the same pixels")
    labeled_fraction: float | None = opt(
        None, "share of slides listed in labels.csv; the rest are unlabeled (default: the "
        "cohort's)")  # fmt: skip
    size_um: tuple[float, ...] | None = opt(
        None, "slide size in micrometres, WxH (default: the generator's)", parse=parse_size_um,
        metavar="WxH")  # fmt: skip
    workers: int = opt(0, "processes writing slides; 0 is one per core")

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", str(self.out))
        if self.size_um is not None:
            object.__setattr__(self, "size_um", tuple(float(v) for v in self.size_um))
        check(bool(self.out), "OUT", "must name a folder")
        self.cohort_kind()
        check(self.slides is None or self.slides >= 1, "--slides",
              f"must be at least 1, got {self.slides}")  # fmt: skip
        check(self.labeled_fraction is None or 0.0 <= self.labeled_fraction <= 1.0,
              "--labeled-fraction", f"must be within 0..1, got {self.labeled_fraction}")  # fmt: skip
        size = self.size_um
        check(size is None or (len(size) == 2 and min(size) > 0), "--size-um",
              f"takes WxH in micrometres, two positive numbers, got {size}")  # fmt: skip
        check(self.workers >= 0, "--workers", f"must be 0 or more, got {self.workers}")

    def cohort_kind(self) -> Cohort:
        """The :class:`Cohort` ``--cohort`` names (ConfigError for an unknown one)."""
        try:
            return cohort_named(self.cohort)
        except ValueError as exc:
            raise ConfigError(f"--cohort: {exc}") from None
