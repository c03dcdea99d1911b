"""The paper's claims judged on the study's numbers, each by a rule stated before the study runs.

Every rule reads a paired 95% interval (:func:`resdistill.measures.paired.paired_difference`: the
test units, patients or slides, and the training seeds resampled together, both arms on the same
units) of a difference in test-tile accuracy averaged over seeds, at each student magnification
of the grid:

1. *Students approach the teacher* (non-inferiority): with every label and every unlabelled
   slide, the lower bound of (distilled - teacher) is above -:data:`NONINFERIORITY_POINTS`.
2. *With few labels distillation beats the baseline* (superiority by a margin): at the smallest
   label fraction, the lower bound of (distilled - baseline) is at least +:data:`GAIN_POINTS`.
3. *Accuracy rises with unlabelled data*: over at least :data:`MIN_SHARES` unlabelled shares,
   every step to the next share has a lower bound above -:data:`STEP_POINTS` (each step
   non-inferior: the data rule out a drop of more than that), and (largest share - smallest)
   has a lower bound above 0.
4. *The high-magnification teacher is what helps* (when the grid has controls): (distilled -
   control) has a lower bound above 0 for every control (a same-resolution teacher, teacher-free
   self-training), at each magnification and label fraction.

A claim holds when every one of its checks does (at every magnification, on every curve). Each
check is then a test at level 2.5% one-sided, and requiring all of them is an intersection-union
test, which needs no multiplicity correction (Berger 1982, Technometrics 24:295). Beside each
verdict the report says whether the *bar* is met by the estimate alone (claim 1: estimate
>= -2 points; claim 2: >= +3; claim 3: no step's estimate below 0; claim 4: > 0), so every bar is
reported, met or not. A check without an interval (too few units, a class missed) does not hold.

Accuracies are fractions (0.93); points are percentage points (1 point = 0.01).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from resdistill.measures.paired import Estimate, points

NONINFERIORITY_POINTS = 2.0
GAIN_POINTS = 3.0
STEP_POINTS = 1.0
MIN_SHARES = 4
CLAIMS = {
    1: "students at 4x/16x/64x fewer FLOPs approach the teacher",
    2: "with few labels, the distilled student beats the supervised baseline",
    3: "accuracy rises with the amount of unlabelled data",
    4: "the high-magnification teacher beats the controls",
}
RULES = {
    1: f"with all labels and every unlabelled slide, the lower bound of the paired 95% interval "
    f"of (distilled - teacher) tile accuracy above -{NONINFERIORITY_POINTS:g} points, at every "
    "student magnification",
    2: f"at the smallest label fraction, the lower bound of the paired 95% interval of "
    f"(distilled - baseline) tile accuracy at least +{GAIN_POINTS:g} points, at every student "
    "magnification",
    3: f"over at least {MIN_SHARES} unlabelled shares, every step to the next share with a paired "
    f"95% interval lower bound above -{STEP_POINTS:g} point and (largest - smallest share) above "
    "0, on every curve (magnification x label fraction)",
    4: "the lower bound of the paired 95% interval of (distilled - control) tile accuracy above 0, "
    "for every control, magnification and label fraction",
}


@dataclass(frozen=True)
class Verdict:
    """One check of a claim (one magnification, or one curve); ``holds`` is None when the check
    cannot be made (too few shares)."""

    what: str
    holds: bool | None
    detail: str


@dataclass(frozen=True)
class Claim:
    number: int
    statement: str
    rule: str
    verdicts: tuple[Verdict, ...]

    @property
    def holds(self) -> bool | None:
        """False when a check fails, True when every check holds, else None (not tested)."""
        if any(v.holds is False for v in self.verdicts):
            return False
        if self.verdicts and all(v.holds for v in self.verdicts):
            return True
        return None

    @property
    def word(self) -> str:
        return {True: "holds", False: "does not hold", None: "not tested"}[self.holds]


def _ci(d: Estimate) -> str:
    if not d.defined:
        return f"{points(d.value)} points, no interval ({d.why})"
    return f"{points(d.value)} points, 95% CI [{points(d.low)}, {points(d.high)}]"


def _bar(met: bool) -> str:
    return f"bar {'met' if met else 'not met'} by the estimate"


def _above(d: Estimate, bound: float, strict: bool = True) -> bool:
    if d.low is None:
        return False
    return d.low > bound if strict else d.low >= bound - 1e-12


def non_inferior(what: str, diff: Estimate, flops_ratio: float, extra: str = "") -> Verdict:
    """Claim 1 at one magnification: ``diff`` is (distilled - teacher)."""
    margin = NONINFERIORITY_POINTS / 100
    return Verdict(what, _above(diff, -margin),
                   f"{flops_ratio:.0f}x fewer FLOPs: distilled - teacher {_ci(diff)}; "
                   f"{_bar(diff.value >= -margin)}; {diff.resamples()}{extra}")  # fmt: skip


def gain(what: str, diff: Estimate, extra: str = "") -> Verdict:
    """Claim 2 at one magnification: ``diff`` is (distilled - baseline)."""
    margin = GAIN_POINTS / 100
    return Verdict(what, _above(diff, margin, strict=False),
                   f"distilled - baseline {_ci(diff)}; {_bar(diff.value >= margin - 1e-12)}; "
                   f"{diff.resamples()}{extra}")  # fmt: skip


def rises(what: str, shares: Sequence[float], steps: Sequence[Estimate],
          overall: Estimate | None) -> Verdict:  # fmt: skip
    """Claim 3 on one curve: ``steps[i]`` is (share ``i + 1`` - share ``i``), shares ascending;
    ``overall`` (largest - smallest)."""
    shown = ", ".join(f"{100 * u:g}%" for u in shares)
    if len(shares) < MIN_SHARES or overall is None:
        return Verdict(what, None, f"shares {shown}: the rule needs {MIN_SHARES}")
    parts = [f"{100 * a:g}% -> {100 * b:g}%: {_ci(d)}"
             for a, b, d in zip(shares, shares[1:], steps, strict=False)]  # fmt: skip
    ok = all(_above(d, -STEP_POINTS / 100) for d in steps) and _above(overall, 0.0)
    bar = all(d.value >= 0 for d in steps)
    return Verdict(what, ok, f"{'; '.join(parts)}; largest - smallest {_ci(overall)}; "
                             f"{_bar(bar)}; {overall.resamples()}")  # fmt: skip


def beats_control(what: str, control: str, diff: Estimate) -> Verdict:
    """Claim 4 for one control: ``diff`` is (distilled - control)."""
    return Verdict(f"{what}, vs {control}", _above(diff, 0.0),
                   f"distilled - {control} {_ci(diff)}; {_bar(diff.value > 0)}; "
                   f"{diff.resamples()}")  # fmt: skip


def judge(
    approach_checks: Sequence[Verdict],
    beats_checks: Sequence[Verdict],
    rises_checks: Sequence[Verdict],
    control_checks: Sequence[Verdict] | None = None,
) -> list[Claim]:
    """The claims from their checks, with the rules from this module's docstring; claim 4 only
    when ``control_checks`` is given (the grid has controls)."""
    checks = {1: approach_checks, 2: beats_checks, 3: rises_checks, 4: control_checks}
    numbers = (1, 2, 3, 4) if control_checks is not None else (1, 2, 3)
    return [Claim(n, CLAIMS[n], RULES[n], tuple(checks[n] or ())) for n in numbers]
