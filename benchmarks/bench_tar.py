"""Samples/s of :func:`resdistill.data.tar_members.iter_samples` against webdataset's
``tar_file_expander`` + ``group_by_keys`` (what ``TileStream`` used), reading one local shard the
way a low-magnification student does: only ``2p5x.jpg`` and ``json`` of 6 members per sample.

Two shard layouts: webdataset's ``TarWriter`` (a pax header before every member, for its float
mtime) and sharding/shardwriter.py's (plain USTAR). Best of ``--repeats`` passes, file in the page
cache; no decoding, so this is the header-parsing and skipping cost alone.

    python benchmarks/bench_tar.py [--samples 50] [--tile-px 224] [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WANTED = {"2p5x.jpg", "json"}


def read_webdataset(path: str) -> int:
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def select(name: str) -> bool:
        return name.split(".", 1)[-1].lower() in WANTED

    with gopen(path, "rb") as stream:
        files = tar_file_expander(
            [{"url": path, "stream": stream}], select_files=select, eof_value=None
        )
        return sum(1 for _ in group_by_keys(files))


def read_ours(path: str) -> int:
    from webdataset.gopen import gopen

    from resdistill.data.tar_members import iter_samples

    with gopen(path, "rb") as stream:
        return sum(1 for _ in iter_samples(stream, WANTED, path))


def best_rate(read: Callable[[str], int], path: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = read(path)
        best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--tile-px", type=int, default=224, help="edge at 20x")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from sharding.layout import shard_name
    from tests.fixtures_data import write_dataset
    from tests.test_tar_members import as_ustar

    with tempfile.TemporaryDirectory(prefix="bench-tar-") as tmp:
        root = Path(tmp)
        write_dataset(root, mags=("20x", "10x", "5x", "2p5x", "1p25x"), tile_px=args.tile_px,
                      shard_sizes={"train": [args.samples]})  # fmt: skip
        pax = root / shard_name("train", 0)
        ustar = root / "ustar.tar"
        ustar.write_bytes(as_ustar(pax.read_bytes()))
        print(f"{'shard':<28}{'webdataset/s':>14}{'ours/s':>12}{'speed-up':>10}")
        for label, path in [("webdataset TarWriter (pax)", pax), ("shardwriter (ustar)", ustar)]:
            assert read_ours(str(path)) == read_webdataset(str(path)) == args.samples
            theirs = best_rate(read_webdataset, str(path), args.repeats)
            ours = best_rate(read_ours, str(path), args.repeats)
            print(f"{label:<28}{theirs:>14.0f}{ours:>12.0f}{ours / theirs:>9.1f}x")


if __name__ == "__main__":
    main()
