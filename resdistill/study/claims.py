"""The paper's three claims judged on the study's numbers, each by a rule stated in the report.

1. *Students approach the teacher*: per student magnification, with every label, the distilled
   student's mean accuracy over seeds is within :data:`APPROACH_POINTS` points of the teacher's
   (or above it). Holds when it does at every magnification.
2. *With few labels distillation beats the baseline*: per student magnification, at the smallest
   label fraction, with every unlabelled slide, the 95% slide-bootstrap interval of (distilled -
   baseline) mean accuracy lies above 0 (paired: the same resampled test slides for both).
   Holds when it does at every magnification.
3. *Accuracy rises with unlabelled data*: per magnification and label fraction, the distilled
   student's mean accuracy at the largest share is above that at the smallest by more than the
   noise, and no step to a larger share drops by more than the noise; the noise is the largest
   standard deviation over seeds along the curve, at least :data:`MIN_NOISE_POINTS` points.
   Holds when it does on every curve.

Accuracies are fractions (0.93); points are percentage points (1 point = 0.01).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

APPROACH_POINTS = 2.0
MIN_NOISE_POINTS = 1.0
CLAIMS = {
    1: "students at 4x/16x/64x fewer FLOPs approach the teacher",
    2: "with few labels, the distilled student beats the supervised baseline",
    3: "accuracy rises with the amount of unlabelled data",
}


@dataclass(frozen=True)
class Verdict:
    """One check of a claim (one magnification, or one curve)."""

    what: str
    holds: bool
    detail: str


@dataclass(frozen=True)
class Claim:
    number: int
    statement: str
    rule: str
    verdicts: tuple[Verdict, ...]

    @property
    def holds(self) -> bool | None:
        """True when every check holds, None when nothing could be checked."""
        return all(v.holds for v in self.verdicts) if self.verdicts else None

    @property
    def word(self) -> str:
        return {True: "holds", False: "does not hold", None: "not tested"}[self.holds]


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def approach(what: str, student: float, teacher: float, flops_ratio: float) -> Verdict:
    """Claim 1 at one magnification: ``student >= teacher - APPROACH_POINTS``."""
    gap = student - teacher
    return Verdict(what, gap >= -APPROACH_POINTS / 100,
                   f"{flops_ratio:.0f}x fewer FLOPs: distilled {student:.3f} vs teacher "
                   f"{teacher:.3f} ({_pts(gap)} points)")  # fmt: skip


def beats(what: str, distilled: float, baseline: float, low: float, high: float) -> Verdict:
    """Claim 2 at one magnification: the interval ``[low, high]`` of distilled - baseline
    lies above 0."""
    return Verdict(what, low > 0,
                   f"distilled {distilled:.3f} vs baseline {baseline:.3f}: difference "
                   f"{_pts(distilled - baseline)} points, 95% CI [{_pts(low)}, {_pts(high)}]")  # fmt: skip


def rises(what: str, curve: Sequence[tuple[float, float, float]]) -> Verdict:
    """Claim 3 on one curve of ``(share, mean, std over seeds)`` (any order)."""
    pts = sorted(curve)
    noise = max([MIN_NOISE_POINTS / 100, *(s for _, _, s in pts)])
    means = [m for _, m, _ in pts]
    shown = ", ".join(f"{100 * u:g}%: {m:.3f}" for u, m, _ in pts)
    if len(pts) < 2:
        return Verdict(what, False, f"one point only ({shown})")
    drops = [b - a for a, b in zip(means, means[1:], strict=False) if b - a < -noise]
    rise = means[-1] - means[0]
    ok = rise > noise and not drops
    why = f"rise {_pts(rise)} points, noise {100 * noise:.1f}"
    if drops:
        why += f", a drop of {_pts(min(drops))}"
    return Verdict(what, ok, f"{shown} ({why})")


def judge(
    approach_checks: Sequence[Verdict],
    beats_checks: Sequence[Verdict],
    rises_checks: Sequence[Verdict],
) -> list[Claim]:
    """The three claims from their checks, with the rules from this module's docstring."""
    rules: Mapping[int, str] = {
        1: f"distilled mean accuracy (all labels, all unlabelled slides) at most "
        f"{APPROACH_POINTS:g} points under the teacher's, at every student magnification",
        2: "at the smallest label fraction, the 95% slide-bootstrap CI of (distilled - baseline) "
        "mean accuracy above 0, at every student magnification",
        3: "mean accuracy at the largest unlabelled share above the smallest by more than the "
        "noise (largest std over seeds on the curve, at least "
        f"{MIN_NOISE_POINTS:g} point), and no step down larger than the noise, on every curve",
    }
    checks = {1: approach_checks, 2: beats_checks, 3: rises_checks}
    return [Claim(n, CLAIMS[n], rules[n], tuple(checks[n])) for n in (1, 2, 3)]
