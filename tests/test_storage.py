"""sharding.storage against a local folder and a real S3 endpoint (moto_server on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from sharding import storage
from sharding.storage import (
    MIB,
    BucketNotFoundError,
    LocalStorage,
    S3Storage,
    aws,
    is_remote,
    is_temp_name,
    local,
    local_path,
    open_storage,
    register_webdataset_s3,
    s3_client,
)

# --------------------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Root URL of an empty store: a folder under tmp_path, or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/data/v1"


def _put_raw(store_url: str, rel: str, data: bytes) -> None:
    """Create a member behind the Storage API's back (a leftover temp file, say)."""
    if is_remote(store_url):
        bucket, prefix = storage.split_s3_url(store_url)
        s3_client().put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)
    else:
        path = Path(store_url, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _raw_names(store_url: str) -> list[str]:
    """Every object under the root, temp files included."""
    if is_remote(store_url):
        bucket, prefix = storage.split_s3_url(store_url)
        resp = s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
        return sorted(o["Key"][len(prefix) + 1 :] for o in resp.get("Contents", ()))
    root = Path(store_url)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _make_shard(path: Path, n: int, seed: int) -> list[tuple[str, bytes, dict]]:
    """Write a webdataset tar of ``n`` samples; return (key, image bytes, json) per sample."""
    import webdataset as wds

    rng = __import__("random").Random(seed)
    samples = []
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            key = f"slide-{seed}_{i * 256}_{seed * 512}"
            image = rng.randbytes(3000 + 17 * i)
            meta = {"slide": f"slide-{seed}", "x": i * 256, "y": seed * 512}
            sink.write({"__key__": key, "10x.jpg": image, "json": json.dumps(meta).encode()})
            samples.append((key, image, meta))
    return samples


def _read_wds(urls: list[str]) -> list[tuple[str, bytes, dict]]:
    import webdataset as wds

    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return [(s["__key__"], s["10x.jpg"], json.loads(s["json"])) for s in ds]


def _socket_count() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # fds come and go while we look
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return n


# --------------------------------------------------------------------------------------------------
# URLs and paths (no I/O)
# --------------------------------------------------------------------------------------------------


def test_url_normalisation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = open_storage("s3://bucket/a/b/")
    assert isinstance(s3, S3Storage) and s3.url == "s3://bucket/a/b"
    assert s3.child_url("train//./shard-000000.tar") == "s3://bucket/a/b/train/shard-000000.tar"
    assert open_storage("s3://bucket").child_url("x") == "s3://bucket/x"
    monkeypatch.chdir(tmp_path)
    rel = open_storage("out/ds")
    assert isinstance(rel, LocalStorage) and rel.url == str(tmp_path / "out" / "ds")
    assert open_storage(f"file://{tmp_path}/ds").url == str(tmp_path / "ds")
    assert open_storage(rel) is rel
    assert is_remote("s3://b/p") and not is_remote(str(tmp_path))
    assert local_path(f"file://{tmp_path}") == tmp_path
    for bad in ("gs://bucket/x", "s3://bucket/../x", "s3:///nobucket"):
        with pytest.raises(ValueError):
            open_storage(bad)
    with pytest.raises(ValueError):
        local_path("s3://b/p")
    assert is_temp_name("train/.shard-000000.tar.1a2b.tmp")
    assert not is_temp_name("train/shard-000000.tar") and not is_temp_name("notes.tmp")


def test_pickle_carries_url_and_options_only(s3_server: str) -> None:
    store = open_storage("s3://bucket/p", multipart_threshold=7 * MIB)
    store.child_url("x")
    clone = pickle.loads(pickle.dumps(store))
    assert clone == store and clone.multipart_threshold == 7 * MIB
    assert b"testing" not in pickle.dumps(store)  # no credential travels with the object


# --------------------------------------------------------------------------------------------------
# the contract, on both backends
# --------------------------------------------------------------------------------------------------


def test_round_trip(store_url: str) -> None:
    store = open_storage(store_url)
    assert store.url == store_url.rstrip("/")
    assert not store.exists("dataset.json")
    store.write_bytes("dataset.json", b'{"v": 1}')
    store.write_bytes("train/shard-000000.tar", b"\x00" * 1000)
    assert store.exists("dataset.json") and store.exists("./train//shard-000000.tar")
    assert store.read_bytes("dataset.json") == b'{"v": 1}'
    store.write_bytes("dataset.json", b'{"v": 2}')  # overwrite
    with store.open_read("dataset.json") as fh:
        assert fh.read(3) == b'{"v' and fh.read() == b'": 2}'
    assert store.child_url("train/shard-000000.tar") == f"{store.url}/train/shard-000000.tar"
    assert store.list() == ["dataset.json", "train/shard-000000.tar"]


def test_atomic_write_leaves_no_temp_and_list_ignores_temps(store_url: str) -> None:
    store = open_storage(store_url)
    store.write_bytes("train/shard-000000.tar", b"a" * 100)
    store.write_bytes("train/shard-000000.tar", b"b" * 100)
    assert _raw_names(store_url) == ["train/shard-000000.tar"]
    # an interrupted local write leaves '.<name>.<rand>.tmp'; readers must never see it
    _put_raw(store_url, "train/.shard-000001.tar.0123abcd.tmp", b"partial")
    _put_raw(store_url, "val/.shard-000000.tar.0123abcd.tmp", b"partial")
    store.write_bytes("ab", b"1")
    store.write_bytes("a/x", b"2")
    store.write_bytes("a/y/z", b"3")
    assert store.list() == ["a/x", "a/y/z", "ab", "train/shard-000000.tar"]
    assert store.list("train/") == ["train/shard-000000.tar"]
    assert store.list("a/") == ["a/x", "a/y/z"]
    assert store.list("a") == ["a/x", "a/y/z", "ab"]  # string prefix, like S3
    assert store.list("a/y") == ["a/y/z"]
    assert store.list("val") == [] and store.list("nothing/") == []


def test_local_failed_write_keeps_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_storage(tmp_path)
    store.write_bytes("m.json", b"old")

    def boom(*_a: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(local.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.write_bytes("m.json", b"new")
    monkeypatch.undo()
    assert store.read_bytes("m.json") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]  # temp removed


def test_delete(store_url: str) -> None:
    store = open_storage(store_url)
    store.write_bytes("_state/slide-a.json", b"{}")
    store.write_bytes("_state/slide-b.json", b"{}")
    store.delete("_state/slide-a.json")
    assert not store.exists("_state/slide-a.json")
    assert store.list("_state/") == ["_state/slide-b.json"]
    store.delete("_state/slide-a.json")  # missing is fine
    store.delete("never/was")


def test_missing_member(store_url: str, tmp_path: Path) -> None:
    store = open_storage(store_url)
    store.write_bytes("present", b"x")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("absent.json")
    with pytest.raises(FileNotFoundError):
        store.open_read("sub/absent.tar")
    with pytest.raises(FileNotFoundError):
        store.put_file("x", tmp_path / "nope")


@pytest.mark.parametrize(
    "bad", ["../escape", "a/../../escape", "/etc/passwd", "a\\..\\b", "", "./"]
)
def test_path_escape_refused(store_url: str, bad: str, tmp_path: Path) -> None:
    store = open_storage(store_url)
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    calls = [
        lambda: store.child_url(bad),
        lambda: store.exists(bad),
        lambda: store.read_bytes(bad),
        lambda: store.write_bytes(bad, b"x"),
        lambda: store.put_file(bad, src),
        lambda: store.delete(bad),
        lambda: store.open_read(bad),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()
    if bad.strip("./"):  # "" and "./" are fine as list prefixes: they mean everything
        with pytest.raises(ValueError):
            store.list(bad)
    assert not (tmp_path / "escape").exists()


def test_put_file_multipart(store_url: str, tmp_path: Path) -> None:
    """Above the threshold S3 gets a multipart upload (ETag '<md5>-<parts>'); bytes identical."""
    store = open_storage(store_url, multipart_threshold=1 * MIB, multipart_chunksize=5 * MIB)
    big = tmp_path / "big.tar"
    payload = os.urandom(5 * MIB + 4096)  # s3transfer's smallest part is 5 MiB -> 2 parts
    big.write_bytes(payload)
    small = tmp_path / "small.json"
    small.write_bytes(b"{}")
    store.put_file("train/shard-000000.tar", big)
    store.put_file("dataset.json", small)
    assert store.read_bytes("train/shard-000000.tar") == payload
    assert store.read_bytes("dataset.json") == b"{}"
    assert store.list() == ["dataset.json", "train/shard-000000.tar"]
    if is_remote(store_url):
        bucket, prefix = storage.split_s3_url(store_url)
        head = s3_client().head_object(Bucket=bucket, Key=f"{prefix}/train/shard-000000.tar")
        assert head["ETag"].strip('"').endswith("-2")
        assert head["ContentLength"] == len(payload)
        small_etag = s3_client().head_object(Bucket=bucket, Key=f"{prefix}/dataset.json")["ETag"]
        assert "-" not in small_etag
    else:
        assert _raw_names(store_url) == ["dataset.json", "train/shard-000000.tar"]


def test_unfinished_multipart_upload_is_invisible(s3_bucket: str) -> None:
    """What a killed put_file leaves on S3: an open multipart upload, which no reader sees."""
    store = open_storage(f"{s3_bucket}/ds")
    client = s3_client()
    bucket = s3_bucket.removeprefix("s3://")
    up = client.create_multipart_upload(Bucket=bucket, Key="ds/train/shard-000000.tar")
    client.upload_part(
        Bucket=bucket,
        Key="ds/train/shard-000000.tar",
        UploadId=up["UploadId"],
        PartNumber=1,
        Body=b"x" * (5 * MIB),
    )
    assert not store.exists("train/shard-000000.tar")
    assert store.list() == []
    with pytest.raises(FileNotFoundError):
        store.read_bytes("train/shard-000000.tar")


def test_missing_bucket_clear_error(s3_server: str, tmp_path: Path) -> None:
    bucket = f"rd-missing-{uuid.uuid4().hex[:10]}"
    store = open_storage(f"s3://{bucket}/ds")
    src = tmp_path / "f"
    src.write_bytes(b"x")
    calls = {
        "check": store.check,
        "exists": lambda: store.exists("a"),
        "read_bytes": lambda: store.read_bytes("a"),
        "open_read": lambda: store.open_read("a"),
        "write_bytes": lambda: store.write_bytes("a", b"x"),
        "put_file": lambda: store.put_file("a", src),
        "list": store.list,
        "delete": lambda: store.delete("a"),
    }
    for name, call in calls.items():
        with pytest.raises(BucketNotFoundError) as info:
            call()
        msg = str(info.value)
        assert "\n" not in msg, name
        assert f"'{bucket}'" in msg and "create it" in msg and "AWS_ENDPOINT_URL" in msg, name
        assert "testing" not in msg  # never a credential


def test_unreachable_endpoint_and_missing_credentials(
    s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.fixtures_ray import free_port

    store = open_storage("s3://some-bucket/ds")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nobody listens
    with pytest.raises(storage.StorageError, match="cannot reach S3 endpoint .*AWS_ENDPOINT_URL"):
        store.list()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    with pytest.raises(storage.StorageError, match="no AWS credentials") as info:
        store.read_bytes("x")
    assert "\n" not in str(info.value)


def test_check_passes_on_existing_bucket(s3_bucket: str) -> None:
    open_storage(s3_bucket).check()
    open_storage(f"{s3_bucket}/deep/prefix").check()


# --------------------------------------------------------------------------------------------------
# other processes
# --------------------------------------------------------------------------------------------------

_CHILD = r"""
import pickle, sys
store = pickle.load(sys.stdin.buffer)
data = store.read_bytes("from-parent")
store.write_bytes("from-child", data[::-1])
print(type(store).__name__, store.url, len(data))
"""


def test_pickled_store_in_subprocess(store_url: str) -> None:
    store = open_storage(store_url)
    store.write_bytes("from-parent", b"hello from the parent")
    out = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=pickle.dumps(store),
        capture_output=True,
        check=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.decode().split() == [type(store).__name__, store.url, "21"]
    assert store.read_bytes("from-child") == b"hello from the parent"[::-1]


def _forked_child(store: storage.Storage, conn) -> None:  # noqa: ANN001
    fresh = len(aws._clients) == 0  # the parent's cached client is not inherited
    store.write_bytes(f"pid-{os.getpid()}", store.read_bytes("seed"))
    conn.send((fresh, os.getpid()))
    conn.close()


def test_forked_children_get_their_own_client(s3_bucket: str) -> None:
    store = open_storage(f"{s3_bucket}/fork")
    store.write_bytes("seed", b"seed-bytes")  # the parent now holds a client and a pool
    assert len(aws._clients) >= 1
    ctx = multiprocessing.get_context("fork")
    results = []
    for _ in range(2):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_forked_child, args=(store, child))
        proc.start()
        results.append(parent.recv())
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert all(fresh for fresh, _ in results)
    assert store.list() == sorted(["seed", *(f"pid-{pid}" for _, pid in results)])
    assert store.read_bytes("seed") == b"seed-bytes"  # parent's client still fine after forks


def _ray_task_body(store: storage.Storage, rel: str) -> tuple[str, int]:
    data = store.read_bytes(rel)
    store.write_bytes(f"{rel}.from-ray", data.upper())
    return store.url, os.getpid()


@pytest.mark.slow
def test_store_in_ray_task(s3_bucket: str, ray_cluster: str) -> None:
    """Ray ships the Storage with cloudpickle; the worker builds its own client."""
    import ray

    from tests.fixtures_s3 import s3_env

    store = open_storage(f"{s3_bucket}/ray")
    store.write_bytes("in", b"shipped by ray")
    if ray.is_initialized():  # an earlier test's driver connection; this test needs its own env
        ray.shutdown()
    ray.init(address=ray_cluster, runtime_env={"env_vars": s3_env()}, log_to_driver=False)
    try:
        url, pid = ray.get(ray.remote(num_cpus=1)(_ray_task_body).remote(store, "in"), timeout=120)
    finally:
        ray.shutdown()
    assert url == store.url and pid != os.getpid()
    assert store.read_bytes("in.from-ray") == b"SHIPPED BY RAY"


# --------------------------------------------------------------------------------------------------
# webdataset
# --------------------------------------------------------------------------------------------------


def test_register_webdataset_s3_idempotent() -> None:
    gopen = importlib.import_module("webdataset.gopen")
    register_webdataset_s3()
    register_webdataset_s3()
    assert gopen.gopen_schemes["s3"] is storage.gopen_s3
    with pytest.raises(ValueError, match="read-only"):
        gopen.gopen("s3://bucket/x.tar", "wb")


def test_webdataset_reads_shards_from_store(store_url: str, tmp_path: Path) -> None:
    import webdataset as wds

    register_webdataset_s3()
    store = open_storage(store_url)
    expected = []
    for i in range(2):
        tar = tmp_path / f"s{i}.tar"
        expected += _make_shard(tar, n=4, seed=i)
        store.put_file(f"train/shard-{i:06d}.tar", tar)
    urls = [store.child_url(f"train/shard-{i:06d}.tar") for i in range(2)]
    assert _read_wds(urls) == expected
    assert _read_wds(urls[1]) == expected[4:]  # a single URL string
    # the lower-level pipeline stages go through the same gopen table
    stages = wds.tariterators.tar_file_expander(wds.tariterators.url_opener([{"url": urls[0]}]))
    files = [s for s in stages if s]
    assert [f["fname"] for f in files] == [
        f"{k}.{m}" for k, _, _ in expected[:4] for m in ("10x.jpg", "json")
    ]
    assert files[0]["data"] == expected[0][1] and files[0]["__url__"] == urls[0]


def _keys_in_fork(url: str) -> list[str]:
    return [s["__key__"] for s in __import__("webdataset").WebDataset(url, shardshuffle=False)]


def test_webdataset_s3_in_forked_workers(s3_bucket: str, tmp_path: Path) -> None:
    register_webdataset_s3()
    store = open_storage(f"{s3_bucket}/ds")
    keys = []
    for i in range(2):
        tar = tmp_path / f"s{i}.tar"
        keys.append([k for k, _, _ in _make_shard(tar, n=3, seed=10 + i)])
        store.put_file(f"train/shard-{i:06d}.tar", tar)
    urls = [store.child_url(f"train/shard-{i:06d}.tar") for i in range(2)]
    assert _keys_in_fork(urls[0]) == keys[0]  # parent has a client before forking
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(_keys_in_fork, urls) == keys


def test_s3_stream_close_releases_connection(s3_bucket: str) -> None:
    """Half-read streams hold a socket each until closed (or garbage-collected, as webdataset does)."""
    gopen = importlib.import_module("webdataset.gopen")

    register_webdataset_s3()
    store = open_storage(f"{s3_bucket}/ds")
    store.write_bytes("big.tar", os.urandom(3 * MIB))
    url = store.child_url("big.tar")
    gopen.gopen(url).close()  # warm up: the client exists
    before = _socket_count()
    streams = [gopen.gopen(url) for _ in range(8)]
    for s in streams:
        assert len(s.read(1000)) == 1000
    assert _socket_count() >= before + 6
    for s in streams:
        s.close()
    assert _socket_count() <= before + 1
    streams = [gopen.gopen(url) for _ in range(8)]
    for s in streams:
        s.read(10)
    assert _socket_count() >= before + 6
    del streams, s
    gc.collect()
    assert _socket_count() <= before + 1
    with pytest.raises(FileNotFoundError):
        gopen.gopen(store.child_url("missing.tar"))


def test_open_read_is_a_binary_stream(s3_bucket: str) -> None:
    store = open_storage(s3_bucket)
    store.write_bytes("x.bin", bytes(range(256)) * 10)
    with store.open_read("x.bin") as fh:
        assert isinstance(fh, io.BufferedIOBase) and fh.readable()
        assert fh.read(256) == bytes(range(256))
        assert len(fh.read()) == 256 * 9
    assert fh.closed
