"""The storage's compare-and-swap (``read_versioned`` / ``replace_if`` / ``delete_if``) that the
lease's heartbeat, takeover and release are built on: on a local folder and on the S3 endpoint."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sharding.storage import StorageError, open_storage
from tests.fixtures_s3 import endpoint_ignoring_if_match

MEMBER = "_state/lease.json"


@pytest.fixture(params=["local", "s3"])
def out_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty output: a folder under tmp_path, or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "ds")
    return f"{request.getfixturevalue('s3_bucket')}/datasets/ds"


def test_replace_if_has_one_winner_and_refuses_a_stale_version(out_url: str) -> None:
    store = open_storage(out_url)
    store.write_bytes(MEMBER, b"first")
    data, version = store.read_versioned(MEMBER)
    assert data == b"first"
    won: list[tuple[int, str]] = []
    start = threading.Barrier(8)

    def attempt(i: int) -> None:
        start.wait()
        new = store.replace_if(MEMBER, f"writer {i}".encode(), version)
        if new is not None:
            won.append((i, new))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1, won
    winner, new_version = won[0]
    assert store.read_versioned(MEMBER) == (f"writer {winner}".encode(), new_version)
    assert new_version != version
    assert store.replace_if(MEMBER, b"late", version) is None, "the old version no longer matches"
    assert not store.delete_if(MEMBER, version)
    assert store.read_bytes(MEMBER) == f"writer {winner}".encode()
    assert store.delete_if(MEMBER, new_version)
    assert not store.exists(MEMBER)
    assert store.replace_if(MEMBER, b"again", new_version) is None, "a deleted member stays gone"
    assert not store.exists(MEMBER)
    assert store.list() == [], "no lock, temp or probe member is left visible"


def test_read_versioned_of_a_missing_member(out_url: str) -> None:
    with pytest.raises(FileNotFoundError):
        open_storage(out_url).read_versioned(MEMBER)


def test_endpoint_ignoring_if_match_is_refused(s3_bucket: str) -> None:
    """An S3-compatible store that drops ``If-Match`` would let a stalled holder overwrite the run
    that took its lease over: it is refused with one line, never trusted."""
    store = open_storage(s3_bucket)
    store.write_bytes(MEMBER, b"held by someone")
    _, version = store.read_versioned(MEMBER)
    with (
        endpoint_ignoring_if_match(),
        pytest.raises(StorageError, match=r"ignores conditional writes \(If-Match") as info,
    ):
        store.replace_if(MEMBER, b"mine", version)
    assert "\n" not in str(info.value)
    assert store.read_bytes(MEMBER) == b"held by someone", "the refused write changed nothing"
    assert store.list() == [MEMBER]
