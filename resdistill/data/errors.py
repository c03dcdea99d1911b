"""The one error a reader raises for a shard it cannot read: :class:`ShardError`.

A corrupted, truncated or missing shard stops training and evaluation with one line naming the
shard; it is never skipped. The error is a :class:`~resdistill.errors.UsageError` (bad input,
exit status 2) and stays one line when it crosses a DataLoader worker or a Ray Train worker.
"""

from __future__ import annotations

from resdistill.errors import UsageError

_NAME = "ShardError: "


class ShardError(UsageError):
    """A shard that cannot be read as the manifest describes it; the message names the shard.

    PyTorch's DataLoader re-raises a worker's exception in the main process as
    ``type(exc)("Caught ShardError in DataLoader worker process 0.\\nOriginal Traceback ...")``;
    such a message is cut back to the original one line (the last line of that traceback).
    """

    def __init__(self, message: str) -> None:
        text = str(message)
        if "\n" in text and _NAME in text:
            last = [ln for ln in text.splitlines() if _NAME in ln][-1]
            text = last.split(_NAME, 1)[1]
        super().__init__(text.strip())


#: the fix for a shard whose bytes are wrong
REWRITE = "restore the shard or write the dataset again"


def shard_error(url: str, problem: str, fix: str = REWRITE) -> ShardError:
    """``ShardError("<url>: <problem>; <fix>")``: the one message of an unreadable shard (an
    empty ``fix`` when ``problem`` already ends with one, as a storage error's message does)."""
    return ShardError(f"{url}: {problem}; {fix}" if fix else f"{url}: {problem}")
