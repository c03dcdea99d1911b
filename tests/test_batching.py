"""``batched``: the fixed-size batches the cached-target and embedding passes run on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from resdistill.train.batching import batched


def test_batches_keep_order_and_the_last_one_holds_the_rest() -> None:
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched(range(6), 3)) == [[0, 1, 2], [3, 4, 5]]
    assert list(batched([], 3)) == []


def test_an_item_is_read_only_when_its_batch_is_built() -> None:
    read: list[int] = []

    def stream() -> Iterator[int]:
        for i in range(5):
            read.append(i)
            yield i

    batches = batched(stream(), 2)
    assert next(batches) == [0, 1]
    assert read == [0, 1]


def test_a_batch_size_under_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        next(batched(range(3), 0))
