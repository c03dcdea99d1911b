"""Slides on S3: list them, and give OpenSlide (which needs a local file) a cached local copy.

A slide task that meets an ``s3://bucket/key.svs`` path calls :func:`local_copy`, which downloads
the object once per node into ``$RESDISTILL_SLIDE_CACHE`` (default ``<tmp>/resdistill-slides``)
under a name derived from the URL, its size and ETag, so a changed object is fetched again. The
download goes to a temporary name and is renamed when complete: concurrent tasks on one node
never open a half-written file. The cache is bounded (``$RESDISTILL_SLIDE_CACHE_GB``, default
50): before a download, least recently used copies are evicted to make room.

Only single-file formats can be read this way (SVS, TIFF, NDPI, ...); multi-file formats such as
MRXS need a shared file system path.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from pathlib import Path

from .slide_files import SLIDE_SUFFIXES, SlideError
from .storage import is_remote, s3_client, split_s3_url

DEFAULT_CACHE_GB = 50.0

#: True for an ``s3://`` slide path (the storage URL rule).
is_s3 = is_remote


def list_s3_slides(url: str) -> list[str]:
    """``s3://`` URLs of the slides at ``url``: the object itself, or every slide under a prefix."""
    bucket, prefix = split_s3_url(url)
    if Path(prefix).suffix.lower() in SLIDE_SUFFIXES:
        return [f"s3://{bucket}/{prefix}"]
    client = s3_client()
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""
    ):
        for obj in page.get("Contents", []):
            if Path(obj["Key"]).suffix.lower() in SLIDE_SUFFIXES:
                out.append(f"s3://{bucket}/{obj['Key']}")
    return sorted(out)


def cache_dir() -> Path:
    root = os.environ.get("RESDISTILL_SLIDE_CACHE") or os.path.join(
        tempfile.gettempdir(), "resdistill-slides"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _evict(cache: Path, need: int) -> None:
    """Delete least recently used copies until ``need`` more bytes fit under the cap."""
    cap = int(float(os.environ.get("RESDISTILL_SLIDE_CACHE_GB", DEFAULT_CACHE_GB)) * 1e9)
    files = [p for p in cache.rglob("*") if p.is_file() and not p.name.startswith(".")]
    used = sum(p.stat().st_size for p in files)
    for p in sorted(files, key=lambda q: q.stat().st_atime):
        if used + need <= cap:
            break
        used -= p.stat().st_size
        p.unlink(missing_ok=True)


def local_copy(url: str) -> str:
    """A local path holding the slide at ``url`` (downloaded once per node and object version)."""
    bucket, key = split_s3_url(url)
    client = s3_client()
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except Exception as exc:  # noqa: BLE001 - one line for the user, whatever boto3 raised
        raise SlideError(
            f"{url}: cannot read the slide from S3 ({exc}): check the URL and access"
        ) from None
    size = int(head["ContentLength"])
    version = hashlib.sha256(f"{url}|{size}|{head.get('ETag', '')}".encode()).hexdigest()[:16]
    cache = cache_dir()
    target = cache / version / Path(key).name
    if target.exists() and target.stat().st_size == size:
        os.utime(target)  # mark as recently used
        return str(target)
    _evict(cache, size)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    try:
        client.download_file(bucket, key, str(tmp))
        if tmp.stat().st_size != size:
            raise SlideError(
                f"{url}: download incomplete ({tmp.stat().st_size} of {size} bytes): retry"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return str(target)
