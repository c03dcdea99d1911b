"""Fixed-size batches of a sample stream, for the passes that run a frozen network once over a
dataset's shards (cached teacher targets, cached backbone embeddings)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def batched(stream: Iterable[T], n: int) -> Iterator[list[T]]:
    """Consecutive lists of ``n`` items of ``stream`` in order, the last one shorter when the
    items run out (never empty); ``itertools.batched`` of Python 3.12, as lists. Lazy: an item is
    read only when its batch is built, so a stream of decoded tiles holds one batch at a time.
    ``ValueError`` when ``n < 1``."""
    if n < 1:
        raise ValueError(f"batch size must be at least 1, got {n}")
    batch: list[T] = []
    for item in stream:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
