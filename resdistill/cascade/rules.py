"""The student-teacher cascade: the student scores every tile, the unsure ones go to the teacher.

For a tile with student probabilities ``p_s`` (``K`` classes) and a threshold ``t``:

* escalated when ``max_k p_s[k] < t`` (:func:`escalate`); ``t = 0`` escalates nothing (the pure
  student), ``t > 1`` every tile (the pure teacher at the student's cost on top);
* its probabilities are ``p_t`` (the teacher's, read at the teacher's magnification from the
  same region) when escalated, else ``p_s`` (:func:`combine`);
* the compute of ``n`` tiles with ``e`` escalated is ``n * F_s + e * F_t`` counted FLOPs
  (:func:`cascade_flops`), the student running on every tile.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_ESCALATE", "cascade_flops", "check_threshold", "combine", "escalate"]

#: Default ``--escalate`` threshold on the student's top probability.
DEFAULT_ESCALATE = 0.8


def check_threshold(value: float) -> float:
    """``value`` as a float when it is a usable threshold on a top probability, ``[0, 1]``;
    ``ValueError`` (one line) otherwise: a top probability is never above 1 (every tile is
    escalated from just above the largest one on) and never under 0 (nothing is escalated)."""
    t = float(value)
    if not 0.0 <= t <= 1.0:  # also rejects NaN
        raise ValueError(
            f"{value:g} is out of range: a threshold on the student's top probability lies in "
            "[0, 1] (0: no tile goes to the teacher, 1: every tile not scored a sure 1.0)"
        )
    return t


def escalate(student_probs: np.ndarray, threshold: float) -> np.ndarray:
    """``(n,)`` bool: tiles whose top student probability is under ``threshold``."""
    p = np.asarray(student_probs)
    if p.ndim != 2:
        raise ValueError(f"student_probs must be (n, K), got shape {p.shape}")
    return p.max(axis=1) < threshold


def combine(student_probs: np.ndarray, teacher_probs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(n, K)``: ``teacher_probs`` rows where ``mask`` else ``student_probs`` rows.

    ``teacher_probs`` is either ``(n, K)`` (every tile scored) or ``(mask.sum(), K)`` (only the
    escalated tiles, in order)."""
    s = np.asarray(student_probs, dtype=np.float64)
    t = np.asarray(teacher_probs, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    out = s.copy()
    if t.shape[0] == s.shape[0]:
        out[m] = t[m]
    elif t.shape[0] == int(m.sum()):
        out[m] = t
    else:
        raise ValueError(
            f"teacher_probs has {t.shape[0]} rows: expected {s.shape[0]} or {int(m.sum())}"
        )
    return out


def cascade_flops(n_tiles: int, n_escalated: int, student_flops: int, teacher_flops: int) -> int:
    """Counted FLOPs of the cascade: ``n_tiles * student_flops + n_escalated * teacher_flops``."""
    return int(n_tiles) * int(student_flops) + int(n_escalated) * int(teacher_flops)
