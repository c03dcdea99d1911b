"""The study's grid: which runs (cells) answer the paper's three claims.

A cell is one training run: a ``teacher`` (supervised at the teacher's magnification, one per
label fraction and seed, unless a teacher checkpoint was given), a ``baseline`` (the student
network on labels only at a student magnification) or a ``distilled`` student (taught by the
teacher of its label fraction and seed, reading the labelled slides plus ``unlabelled_share`` of
the other training slides). The grid is::

    teachers:  label fraction x seed                                  (fractions without a given teacher)
    baselines: student mag x label fraction x seed
    distilled: student mag x label fraction x unlabelled share x seed

The unlabelled share does not multiply the baselines: they read labelled slides only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

KIND_TEACHER, KIND_BASELINE, KIND_DISTILLED = "teacher", "baseline", "distilled"
KINDS = (KIND_TEACHER, KIND_BASELINE, KIND_DISTILLED)

#: the paper's grid
LABEL_FRACTIONS = (1.0, 0.1)
UNLABELLED_SHARES = (0.0, 0.25, 0.5, 1.0)
SEEDS = 3


@dataclass(frozen=True)
class Cell:
    """One run of the grid; ``unlabelled_share`` is None for teachers and baselines."""

    kind: str
    mag: str  # dataset name of the magnification the model reads, e.g. 2p5x
    label_fraction: float
    seed: int
    unlabelled_share: float | None = None

    @property
    def id(self) -> str:
        """``<kind>-<mag>-l<fraction>[-u<share>]-s<seed>``: unique in a grid, a file name."""
        share = "" if self.unlabelled_share is None else f"-u{self.unlabelled_share:g}"
        return f"{self.kind}-{self.mag}-l{self.label_fraction:g}{share}-s{self.seed}"

    @property
    def group(self) -> tuple[str, str, float, float | None]:
        """The cell without its seed: what the report averages over seeds."""
        return (self.kind, self.mag, self.label_fraction, self.unlabelled_share)


@dataclass(frozen=True)
class Grid:
    """The study's axes; ``given`` maps a label fraction to a teacher checkpoint given by the
    user (no teacher cells are trained for it)."""

    teacher_mag: str
    student_mags: tuple[str, ...]
    label_fractions: tuple[float, ...] = LABEL_FRACTIONS
    unlabelled_shares: tuple[float, ...] = UNLABELLED_SHARES
    seeds: tuple[int, ...] = tuple(range(SEEDS))
    given: Mapping[float, str] = field(default_factory=dict)

    def teacher_cells(self) -> list[Cell]:
        return [
            Cell(KIND_TEACHER, self.teacher_mag, f, s)
            for f in self.label_fractions
            if f not in self.given
            for s in self.seeds
        ]

    def student_cells(self) -> list[Cell]:
        out: list[Cell] = []
        for mag in self.student_mags:
            for f in self.label_fractions:
                for s in self.seeds:
                    out.append(Cell(KIND_BASELINE, mag, f, s))
                    out += [Cell(KIND_DISTILLED, mag, f, s, u) for u in self.unlabelled_shares]
        return out

    def cells(self) -> list[Cell]:
        return self.teacher_cells() + self.student_cells()

    def teacher_of(self, cell: Cell) -> Cell | None:
        """The teacher cell a distilled cell learns from (None when its teacher was given)."""
        if cell.label_fraction in self.given:
            return None
        return Cell(KIND_TEACHER, self.teacher_mag, cell.label_fraction, cell.seed)


def student_mags_below(mags: Sequence[str], teacher_mag: str) -> tuple[str, ...]:
    """Every magnification of ``mags`` below ``teacher_mag``, highest first."""
    from sharding.magnification import Magnification

    top = Magnification.parse(teacher_mag).power
    below = [m for m in mags if Magnification.parse(m).power < top]
    return tuple(sorted(below, key=lambda m: -Magnification.parse(m).power))
