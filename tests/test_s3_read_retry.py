"""A shard read from S3 survives a connection that resets or stalls part-way: the read resumes
at the byte offset reached (a ranged GET on the same ETag), a bounded number of times within a
bounded time, and then fails with one line naming the object. Run against the real local S3
endpoint (moto) behind :class:`tests.fault_proxy.FaultProxy`."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from resdistill.data import DatasetInfo, ShardError, TileStream, read_manifest, shard_keys
from sharding.storage import StorageError, open_storage, split_s3_url
from sharding.storage.aws import s3_client
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.timeout(60)

#: the read timeout of the S3 client (sharding.storage.aws), 1 s here so a stall costs 1 s
READ_TIMEOUT_ENV = "RESDISTILL_S3_READ_TIMEOUT"
SIZE = 3 * 1024 * 1024 + 123
#: what giving up may take at most here: each try's 1 s read timeout plus the backoff, with room
BOUND_S = 25.0


@pytest.fixture
def s3_object(s3_bucket: str) -> tuple[str, str, bytes]:
    """``(bucket, key, bytes)`` of a 3 MiB object of random bytes."""
    bucket, _ = split_s3_url(s3_bucket)
    data = os.urandom(SIZE)
    s3_client().put_object(Bucket=bucket, Key="blob.tar", Body=data)
    return bucket, "blob.tar", data


def open_s3_object(bucket: str, key: str):  # type: ignore[no-untyped-def]
    """The object's read stream, through the storage contract (``open_read``)."""
    return open_storage(f"s3://{bucket}").open_read(key)


@pytest.fixture
def proxied(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator:  # type: ignore[type-arg]
    """``proxied(mode, after, times)``: a FaultProxy in front of moto, made the endpoint of new
    S3 clients, with a 1 s read timeout."""
    proxies: list[FaultProxy] = []

    def start(mode: str, after: int, times: int = 1) -> FaultProxy:
        proxy = FaultProxy(s3_server, mode=mode, after=after, times=times).__enter__()  # type: ignore[arg-type]
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv(READ_TIMEOUT_ENV, "1")
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()


@pytest.mark.parametrize("mode", ["reset", "stall"])
def test_a_broken_read_resumes_at_the_byte_offset(s3_object, proxied, mode: str) -> None:
    bucket, key, data = s3_object
    proxy = proxied(mode, after=SIZE // 2)
    start = time.monotonic()
    with open_s3_object(bucket, key) as stream:
        got = stream.read()
    assert got == data
    assert proxy.faults == 1 and proxy.connections >= 2
    assert time.monotonic() - start < BOUND_S


@pytest.mark.parametrize("mode", ["reset", "stall"])
def test_a_connection_that_keeps_breaking_gives_up_in_bounded_time(
    s3_object, proxied, mode: str
) -> None:
    from sharding.storage.s3_read import READ_RETRIES

    bucket, key, _ = s3_object
    proxy = proxied(mode, after=256 * 1024, times=1000)
    start = time.monotonic()
    with pytest.raises(StorageError) as err, open_s3_object(bucket, key) as stream:
        stream.read()
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert "\n" not in message and f"s3://{bucket}/{key}" in message, message
    assert f"{READ_RETRIES + 1} times" in message, message
    assert proxy.faults == READ_RETRIES + 1
    assert elapsed < BOUND_S, elapsed


def test_an_object_replaced_mid_read_is_not_spliced(s3_object, proxied) -> None:
    """The resumed read asks for the same ETag: a new object under the key is refused, never
    joined onto the old one's first half."""
    bucket, key, data = s3_object
    proxy = proxied("stall", after=SIZE // 2)
    with open_s3_object(bucket, key) as stream:
        first = stream.read(1024 * 1024)
        s3_client().put_object(Bucket=bucket, Key=key, Body=os.urandom(SIZE))
        with pytest.raises(StorageError, match="changed while it was read") as err:
            stream.read()
    assert first == data[: len(first)] and proxy.faults == 1
    assert "\n" not in str(err.value)


def _stream(url: str) -> TileStream:
    info = DatasetInfo.load(url)
    return TileStream(info, shard_keys(read_manifest(url), ["train"]), ["10x", "5x"], repeat=False)


def _samples(stream: TileStream) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(images[0].shape)) for images, _label, key in stream]


def test_a_training_stream_survives_a_reset(tiny_dataset_s3: str, proxied) -> None:
    stream = _stream(tiny_dataset_s3)  # dataset.json and manifest read straight from moto
    want = _samples(stream)
    assert len(want) == 48
    proxy = proxied("reset", after=20_000)  # inside the first shard (~80 kB)
    assert _samples(stream) == want
    assert proxy.faults == 1


def test_a_training_stream_that_cannot_read_a_shard_stops_with_the_shard_error(
    tiny_dataset_s3: str, proxied
) -> None:
    stream = _stream(tiny_dataset_s3)
    proxied("reset", after=20_000, times=1000)
    start = time.monotonic()
    with pytest.raises(ShardError) as err:
        _samples(stream)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tiny_dataset_s3}/train/"), message
    assert "restore the shard" not in message and "check the network" in message, message
    assert time.monotonic() - start < BOUND_S
