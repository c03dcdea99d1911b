"""The study's grid: which runs (cells) answer the paper's claims, and the two controls.

A cell is one training run. The arms:

* ``teacher``: supervised at the teacher's magnification, one per label fraction and seed
  (none for a fraction whose teacher checkpoint was given);
* ``baseline``: the student network on labels only, at a student magnification;
* ``distilled``: the student taught by the teacher of its label fraction and seed, reading the
  labelled slides plus ``unlabelled_share`` of the other training slides;
* control ``same-res``: a ``same-res-teacher`` (trained as the teacher is, same labels, but at
  the student's magnification) distilled into the student exactly as the teacher is
  (``same-res-distilled``: the same loss, unlabelled slides and steps). It holds everything but
  the teacher's magnification fixed: if the high-magnification teacher transfers what low
  magnification cannot see, ``distilled`` beats it;
* control ``self-training``: teacher-free semi-supervised learning at the student's
  magnification. The ``baseline`` cell of the same labels and seed pseudo-labels the training
  slides and a fresh student learns them: the distillation machinery with the baseline as its
  same-magnification "teacher", the KD term and cross-entropy on the cell's labelled tiles, which
  is self-training with soft pseudo-labels and a supervised term (Xie et al. 2020, "Self-training
  with Noisy Student"; Sohn et al. 2020, FixMatch). It tells "a high-magnification teacher helps"
  from "pseudo-labels on unlabelled slides help". The baseline's soft labels teach a tile only
  where its top probability reaches ``--self-training-threshold`` (FixMatch's confidence mask).
* ablation ``feature-term``: the distilled student with the feature term off
  (``feature-off``), on the student's last map (``feature-global``, the paper's rule, one cell
  at 2.5x and 1.25x on 128 px teacher tiles) and on a spatial grid (``feature-spatial``),
  everything else as ``distilled``, whose own variant is not run twice (:mod:`resdistill.study.
  ablation`). It shows whether the feature term earns its place.

The grid (``M`` student magnifications, ``F`` label fractions, ``U`` unlabelled shares, ``S``
seeds; controls at the largest share, the point the claims compare)::

    teachers:            F x S            (fractions without a given teacher)
    baselines:           M x F x S
    distilled:           M x F x U x S
    same-res teachers:   M x F x S        (control same-res)
    same-res distilled:  M x F x S        (control same-res)
    self-training:       M x F x S        (control self-training; its teacher is the baseline cell)
    feature-*:           2 x M x F x S    (ablation feature-term: the two variants distilled is not)

Teachers are shared: one teacher cell teaches every share of its fraction and seed, one
baseline cell is also its self-training teacher. Each arm (:class:`Arm`: kind, magnification,
label fraction) first tries the same recipes in its tuning trials (:meth:`Grid.trial_cells`,
seed :data:`TUNING_SEED`, never a reported seed), see :mod:`resdistill.study.recipes`; an
ablation changes one thing only, so its cells take the distilled arm's recipe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

KIND_TEACHER, KIND_BASELINE, KIND_DISTILLED = "teacher", "baseline", "distilled"
KIND_SAME_RES_TEACHER, KIND_SAME_RES = "same-res-teacher", "same-res-distilled"
KIND_SELF_TRAINING = "self-training"
#: the kinds that are not controls (the report compares every other kind with ``distilled``);
#: the same-resolution teacher is a control's teacher, not a control
KINDS = (KIND_TEACHER, KIND_SAME_RES_TEACHER, KIND_BASELINE, KIND_DISTILLED)
#: the kinds that learn from a teacher's outputs, and the kinds that learn from labels
KD_KINDS = (KIND_DISTILLED, KIND_SAME_RES, KIND_SELF_TRAINING)
SUPERVISED_KINDS = (KIND_TEACHER, KIND_SAME_RES_TEACHER, KIND_BASELINE)
#: ``--controls``: the name of each control and the kinds it adds to the grid
CONTROL_SAME_RES, CONTROL_SELF_TRAINING = "same-res", "self-training"
CONTROLS = {
    CONTROL_SAME_RES: (KIND_SAME_RES_TEACHER, KIND_SAME_RES),
    CONTROL_SELF_TRAINING: (KIND_SELF_TRAINING,),
}
#: the feature term's variants (:mod:`resdistill.study.ablation`) and their ablation kinds
FEATURE_VARIANTS = ("off", "global", "spatial")
ABLATION_FEATURE = "feature-term"
FEATURE_KINDS = tuple(f"feature-{v}" for v in FEATURE_VARIANTS)
#: ``--ablations``: the name of each ablation and the kinds it adds (distilled cells that differ
#: in one setting; they are neither arms of their own nor controls)
ABLATIONS = {ABLATION_FEATURE: FEATURE_KINDS}
ABLATION_KINDS = FEATURE_KINDS

#: the paper's grid
LABEL_FRACTIONS = (1.0, 0.1)
UNLABELLED_SHARES = (0.0, 0.25, 0.5, 1.0)
SEEDS = 3
#: the seed of every tuning trial: the recipe is chosen on runs that are not reported
TUNING_SEED = 1000


@dataclass(frozen=True)
class Cell:
    """One run of the grid; ``unlabelled_share`` is None for the kinds that read labels only;
    ``trial`` is set on an arm's tuning trials only."""

    kind: str
    mag: str  # dataset name of the magnification the model reads, e.g. 2p5x
    label_fraction: float
    seed: int
    unlabelled_share: float | None = None
    trial: int | None = None

    @property
    def id(self) -> str:
        """``<kind>-<mag>-l<fraction>[-u<share>]-s<seed>[-t<trial>]``: unique, a file name."""
        share = "" if self.unlabelled_share is None else f"-u{self.unlabelled_share:g}"
        trial = "" if self.trial is None else f"-t{self.trial}"
        return f"{self.kind}-{self.mag}-l{self.label_fraction:g}{share}-s{self.seed}{trial}"

    @property
    def group(self) -> tuple[str, str, float, float | None]:
        """The cell without its seed: what the report averages over seeds."""
        return (self.kind, self.mag, self.label_fraction, self.unlabelled_share)

    @property
    def arm(self) -> Arm:
        return Arm(self.kind, self.mag, self.label_fraction)


@dataclass(frozen=True)
class Arm:
    """What one recipe is chosen for: a kind at a magnification and label fraction."""

    kind: str
    mag: str
    label_fraction: float

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.mag}-l{self.label_fraction:g}"


def variant_of(loss: Mapping[str, Any]) -> str:
    """The feature term's variant a loss config (a mapping of some of its fields, the rest
    :class:`~resdistill.config.LossConfig`'s defaults) runs: ``off`` without the feature term,
    ``global`` on the last map, ``spatial`` on a grid."""
    from dataclasses import asdict

    from resdistill.config import LossConfig

    full = {**asdict(LossConfig()), **loss}
    if float(full["feature_weight"]) == 0:
        return "off"
    return "spatial" if int(full["feature_grid"] or 0) else "global"


@dataclass(frozen=True)
class Grid:
    """The study's axes; ``given`` maps a label fraction to a teacher checkpoint given by the
    user (no teacher cells are trained for it); ``controls`` names :data:`CONTROLS`."""

    teacher_mag: str
    student_mags: tuple[str, ...]
    label_fractions: tuple[float, ...] = LABEL_FRACTIONS
    unlabelled_shares: tuple[float, ...] = UNLABELLED_SHARES
    seeds: tuple[int, ...] = tuple(range(SEEDS))
    given: Mapping[float, str] = field(default_factory=dict)
    controls: tuple[str, ...] = ()
    ablations: tuple[str, ...] = ()
    #: the feature term's variant the distilled cells run (default: the loss defaults')
    feature_default: str = field(default_factory=lambda: variant_of({}))

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every kind this grid trains, in phase order (teachers before their students)."""
        extra = {k for c in self.controls for k in CONTROLS[c]}
        if ABLATION_FEATURE in self.ablations:
            extra |= {k for k in FEATURE_KINDS if k != f"feature-{self.feature_default}"}
        return tuple(k for k in (*SUPERVISED_KINDS, *KD_KINDS, *ABLATION_KINDS)
                     if k in (KIND_TEACHER, KIND_BASELINE, KIND_DISTILLED) or k in extra)  # fmt: skip

    def variant(self, kind: str) -> str | None:
        """The feature term's variant of a ``kind`` that distils like ``distilled`` (its own,
        or an ablation's); None for the others."""
        if kind == KIND_DISTILLED:
            return self.feature_default
        return kind.removeprefix("feature-") if kind in FEATURE_KINDS else None

    @property
    def top_share(self) -> float:
        """The largest unlabelled share: where the controls run and the KD arms are tuned."""
        return max(self.unlabelled_shares)

    def teacher_cells(self) -> list[Cell]:
        return [
            Cell(KIND_TEACHER, self.teacher_mag, f, s)
            for f in self.label_fractions
            if f not in self.given
            for s in self.seeds
        ]

    def student_cells(self) -> list[Cell]:
        out: list[Cell] = []
        kinds = self.kinds
        for mag in self.student_mags:
            for f in self.label_fractions:
                for s in self.seeds:
                    out.append(Cell(KIND_BASELINE, mag, f, s))
                    out += [Cell(KIND_DISTILLED, mag, f, s, u) for u in self.unlabelled_shares]
                    extra = (KIND_SAME_RES_TEACHER, KIND_SAME_RES, KIND_SELF_TRAINING)
                    for kind in (*extra, *ABLATION_KINDS):
                        if kind in kinds:
                            share = None if kind == KIND_SAME_RES_TEACHER else self.top_share
                            out.append(Cell(kind, mag, f, s, share))
        return out

    def cells(self) -> list[Cell]:
        return self.teacher_cells() + self.student_cells()

    def arms(self) -> list[Arm]:
        """Every arm that is trained here (a given teacher's is not), in phase order; an
        ablation's cells are no arm (they take the distilled arm's recipe, :meth:`recipe_arm`)."""
        order = {k: i for i, k in enumerate(self.kinds)}
        arms = {c.arm for c in self.cells() if c.kind not in ABLATION_KINDS}
        return sorted(arms, key=lambda a: (order[a.kind], a.mag, -a.label_fraction))

    def trial_cells(self, arm: Arm, trials: int) -> list[Cell]:
        """The tuning trials of ``arm``: one per recipe, at :data:`TUNING_SEED` (and, for the
        kinds that read unlabelled slides, at the largest share)."""
        share = self.top_share if arm.kind in KD_KINDS else None
        return [Cell(arm.kind, arm.mag, arm.label_fraction, TUNING_SEED, share, i)
                for i in range(trials)]  # fmt: skip

    def recipe_arm(self, cell: Cell) -> Arm:
        """The arm whose chosen recipe ``cell`` trains with: its own, or for an ablation's cell
        the distilled arm of its magnification and label fraction."""
        kind = KIND_DISTILLED if cell.kind in ABLATION_KINDS else cell.kind
        return Arm(kind, cell.mag, cell.label_fraction)

    def teacher_of(self, cell: Cell) -> Cell | None:
        """The cell whose checkpoint teaches ``cell`` (None when it is the given teacher of its
        fraction, or ``cell`` learns from labels). A tuning trial learns from the teacher of the
        first seed."""
        seed = self.seeds[0] if cell.trial is not None else cell.seed
        f = cell.label_fraction
        if cell.kind == KIND_DISTILLED or cell.kind in ABLATION_KINDS:
            return None if f in self.given else Cell(KIND_TEACHER, self.teacher_mag, f, seed)
        if cell.kind == KIND_SAME_RES:
            return Cell(KIND_SAME_RES_TEACHER, cell.mag, f, seed)
        if cell.kind == KIND_SELF_TRAINING:
            return Cell(KIND_BASELINE, cell.mag, f, seed)
        return None


def student_mags_below(mags: Sequence[str], teacher_mag: str) -> tuple[str, ...]:
    """Every magnification of ``mags`` below ``teacher_mag``, highest first."""
    from sharding.magnification import Magnification

    top = Magnification.parse(teacher_mag).power
    below = [m for m in mags if Magnification.parse(m).power < top]
    return tuple(sorted(below, key=lambda m: -Magnification.parse(m).power))
