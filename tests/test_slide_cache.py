"""The node's cache of S3 slides (``sharding.remote_slides``): private to its user, one download
per slide however many tasks ask at once, a copy trusted only with its recorded size and ETag,
and eviction that never removes a slide in use nor fails a reader (threads and processes racing
under a cap smaller than the slides in use). Real slides on the moto S3 endpoint; bounded time.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import stat
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sharding import remote_slides
from sharding.slide_files import SlideError
from sharding.storage import open_storage, s3_client
from tests.slide_factory import blob_image, write_slide

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh default cache location: ``<tmp>/resdistill-slides-<uid>`` under a test folder."""
    monkeypatch.delenv("RESDISTILL_SLIDE_CACHE", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path / "tmp"


def _slides(tmp: Path, bucket: str, n: int) -> dict[str, str]:
    """``n`` real slides (tiled pyramids) on S3: url -> sha256 of their bytes."""
    store = open_storage(f"{bucket}/cohort")
    out = {}
    for i in range(n):
        path = write_slide(tmp / f"s{i}.svs", blob_image(640, 512, seed=i), app_mag=20)
        store.put_file(path.name, path)
        out[store.child_url(path.name)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _sha(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _count_gets() -> list[int]:
    """GET requests this process's S3 client sends from now on (a boto3 event hook)."""
    calls = [0]

    def hook(**_: object) -> None:
        calls[0] += 1

    s3_client().meta.events.register("before-call.s3.GetObject", hook)
    return calls


def test_the_cache_is_a_private_folder_of_its_user(cache: Path, s3_bucket: str, tmp_path):
    url = next(iter(_slides(tmp_path, s3_bucket, 1)))
    path = Path(remote_slides.local_copy(url))
    root = cache / f"resdistill-slides-{os.geteuid()}"
    assert root in path.parents
    assert stat.S_IMODE(root.stat().st_mode) == 0o700

    os.chmod(root, 0o777)  # ours but opened up: closed again
    remote_slides.local_copy(url)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700

    elsewhere = tmp_path / "planted"
    elsewhere.mkdir()
    os.rename(root, tmp_path / "moved")
    root.symlink_to(elsewhere)  # a symlink planted at the predictable name
    with pytest.raises(SlideError, match="symlink") as err:
        remote_slides.local_copy(url)
    assert str(root) in str(err.value) and "RESDISTILL_SLIDE_CACHE" in str(err.value)
    root.unlink()
    if os.geteuid() == 0:  # root can make a folder another user's
        root.mkdir(mode=0o777)
        os.chown(root, 65534, 65534)
        with pytest.raises(SlideError, match="belongs to user id 65534"):
            remote_slides.local_copy(url)


def test_a_copy_is_trusted_only_with_its_recorded_etag(cache: Path, s3_bucket: str, tmp_path):
    slides = _slides(tmp_path, s3_bucket, 1)
    url, sha = next(iter(slides.items()))
    path = remote_slides.local_copy(url)
    assert _sha(path) == sha
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:  # same size, other bytes, and no record of where it came from
        fh.write(os.urandom(size))
    (Path(path).parent / "source.json").unlink(missing_ok=True)
    assert _sha(remote_slides.local_copy(url)) == sha

    other = write_slide(tmp_path / "o.svs", blob_image(640, 512, seed=99), app_mag=20)
    data = other.read_bytes()[:size].ljust(size, b"\0")  # same size, other bytes: a new ETag
    s3_client().put_object(Bucket=s3_bucket[5:], Key="cohort/s0.svs", Body=data)
    assert _sha(remote_slides.local_copy(url)) == hashlib.sha256(data).hexdigest()


def test_concurrent_uses_of_a_slide_download_it_once(cache: Path, s3_bucket: str, tmp_path):
    url, sha = next(iter(_slides(tmp_path, s3_bucket, 1).items()))
    gets = _count_gets()
    start = threading.Barrier(8)

    def use(_: int) -> str:
        start.wait(timeout=30)
        return _sha(remote_slides.local_copy(url))

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(use, range(8))) == {sha}
    assert gets[0] == 1


def _race(urls: dict[str, str], rounds: int, seed: int) -> list[str]:
    """Use random slides ``rounds`` times (pinned while read whole); the problems seen."""
    rng = random.Random(seed)
    problems = []
    for _ in range(rounds):
        url = rng.choice(sorted(urls))
        try:
            path = remote_slides.local_copy(url)
            if _sha(path) != urls[url]:
                problems.append(f"{url}: wrong bytes")
        except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
            problems.append(f"{url}: {type(exc).__name__}: {exc}")
    return problems


def _process_race(args: tuple[dict[str, str], int, int]) -> list[str]:
    return _race(*args)


@pytest.mark.slow
def test_eviction_races_fail_no_reader(
    cache: Path, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = _slides(tmp_path, s3_bucket, 5)
    size = max(os.path.getsize(tmp_path / f"s{i}.svs") for i in range(5))
    monkeypatch.setenv("RESDISTILL_SLIDE_CACHE_GB", str(1.5 * size / 1e9))  # room for one slide
    with ThreadPoolExecutor(6) as pool:
        problems = [p for got in pool.map(lambda k: _race(urls, 25, k), range(6)) for p in got]
    assert problems == []
    spawn = multiprocessing.get_context("spawn")  # processes share the cache, not the client
    monkeypatch.setenv("TMPDIR", tempfile.tempdir or "")  # the children's default cache: ours
    with spawn.Pool(3) as pool:
        got = pool.map(_process_race, [(urls, 15, 100 + k) for k in range(3)], chunksize=1)
    assert [p for g in got for p in g] == []


def test_a_pinned_slide_is_never_evicted(
    cache: Path, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = sorted(_slides(tmp_path, s3_bucket, 4))
    size = os.path.getsize(tmp_path / "s0.svs")
    monkeypatch.setenv("RESDISTILL_SLIDE_CACHE_GB", str(1.5 * size / 1e9))
    gets = _count_gets()
    with remote_slides.pinned_copy(urls[0]) as first:
        inode = os.stat(first).st_ino
        for url in urls[1:]:  # each needs room the pinned one holds: the cache goes over its cap
            with remote_slides.pinned_copy(url):
                pass
        assert os.stat(first).st_ino == inode
        with remote_slides.pinned_copy(urls[0]) as again:  # a chunk after others: no download
            assert again == first and os.stat(again).st_ino == inode
    assert gets[0] == len(urls)
    with remote_slides.pinned_copy(urls[1]):  # unpinned now: the least recently used goes
        pass
    assert not os.path.exists(first)


def test_a_killed_task_leaves_no_pin(
    cache: Path, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = sorted(_slides(tmp_path, s3_bucket, 2))
    size = os.path.getsize(tmp_path / "s0.svs")
    monkeypatch.setenv("RESDISTILL_SLIDE_CACHE_GB", str(1.5 * size / 1e9))
    code = (
        "import os, sys\n"
        "from sharding.remote_slides import local_copy\n"
        "print(local_copy(sys.argv[1]), flush=True)\n"
        "os._exit(9)\n"  # killed while it pins the slide
    )
    env = dict(os.environ, TMPDIR=tempfile.tempdir or "")
    done = subprocess.run(
        [sys.executable, "-c", code, urls[0]], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 9, done.stderr
    path = done.stdout.strip()
    assert os.path.exists(path)
    remote_slides.local_copy(urls[1])  # needs its room: the dead task's pin is gone
    assert not os.path.exists(path)
