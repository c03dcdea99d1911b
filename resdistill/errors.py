"""Errors every command reports the same way.

A :class:`UsageError` is input that cannot work (an option, a dataset, a checkpoint): the
command prints its message as one line naming the input and the fix, and exits with status 2.
The specific kinds (:class:`CheckpointError`,
:class:`resdistill.eval.evaluate.EvaluationError`) derive from it, so a command catches one class.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Options or data that cannot work; reported as one line, exit status 2."""


class CheckpointError(UsageError):
    """A checkpoint that is missing or is not a resdistill model checkpoint (one line)."""
