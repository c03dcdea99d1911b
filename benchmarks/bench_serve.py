"""What native reads cost in accuracy: a student under each train/serve pairing.

    python benchmarks/bench_serve.py --demo demo      # a finished `resdistill demo --out demo`

The demo's student (``distilled-cached``) was trained on the pixels of ``top``: each 2.5x tile
box-reduced from the 10x read. This script shards the same slides again with
``--low-mags-from native`` (the 2.5x tiles read from the slide's own pyramid; same regions,
splits and 10x tiles), distils a second student on it exactly as the demo distilled its own (the
demo's options as its ``config.yaml`` records them, its teacher, cached targets), and predicts every test slide with each student
and each read mode (``--read as-trained`` / ``native``) through
:func:`bench_predict.profile_one`. Reported per pairing: tile accuracy (each tile against its
slide's label: the demo's slides hold one class each) and slide accuracy (argmax of the mean tile
probability), on the same test slides.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

if TYPE_CHECKING:
    from resdistill.demo import DemoConfig


def native_dataset(demo: Path, desc: dict[str, Any]) -> Path:
    """``demo/dataset-native``: the demo's slides sharded as the demo did, lower magnifications
    from the pyramid (kept when already there)."""
    from sharding.pipeline import run_shard
    from sharding.synthetic import LABELS_CSV

    out = demo / "dataset-native"
    if (out / "dataset.json").exists():
        return out
    top = desc["magnifications"][0]
    rep = run_shard(
        [demo / "slides"], str(out), mags=",".join(desc["magnifications"]),
        tile_px=int(desc["tile_px"][top]), labels=demo / "slides" / LABELS_CSV,
        splits=(0.6, 0.2, 0.2), seed=demo_config(demo).seed, shard_size="64MB", progress=False,
        low_mags_from="native",
    )  # fmt: skip
    if not rep.ok:
        raise SystemExit(f"sharding {out} failed: {rep}")
    return out


def demo_config(demo: Path) -> DemoConfig:
    """The options the demo ran with (its ``config.yaml``; the defaults for a demo older than
    that file), on the local Ray session this script starts."""
    from resdistill.demo import DemoConfig
    from resdistill.fields import from_plain
    from resdistill.run_config import read_config_file

    path = demo / "config.yaml"
    cfg = from_plain(DemoConfig, read_config_file(str(path))) if path.exists() else DemoConfig()
    return replace(cfg, out=str(demo), address=None)


def native_student(demo: Path, data: Path, s_mag: str) -> str:
    """A student distilled on ``data`` exactly as the demo distilled ``distilled-cached`` (its
    options, teacher and cached targets: :func:`resdistill.demo.stage_config`); kept when
    already trained."""
    from resdistill.config import STAGE_DISTILL, TeacherRef
    from resdistill.demo import stage_config
    from resdistill.train.driver import train
    from resdistill.train.targets import write_targets
    from resdistill.train.targets_config import TargetsConfig

    runs = demo / "runs-native"
    best = runs / "distilled-cached.best"
    if best.exists():
        return best.read_text().strip()
    d = demo_config(demo)
    teacher = demo_models(demo)["teacher"]
    targets = write_targets(
        TargetsConfig(data=str(data), teacher=str(teacher), student_mags=(s_mag,))
    ).url
    cfg = stage_config(d, STAGE_DISTILL, "distilled-cached", str(data), str(runs), targets=targets)
    out = train(replace(cfg, teacher=TeacherRef(checkpoint=str(teacher)))).best_checkpoint
    best.write_text(out)
    return out


def demo_models(demo: Path) -> dict[str, str]:
    """``{name: best checkpoint}`` of the demo's runs (its ``eval/demo.json``)."""
    return json.loads((demo / "eval" / "demo.json").read_text())["models"]


def demo_test_slides(demo: Path) -> tuple[list[Path], dict[str, str]]:
    """The demo's test slides (files) and ``{slide id: label}``, from its dataset's manifest."""
    from resdistill.data import read_manifest

    m = read_manifest(str(demo / "dataset"), columns=["slide", "split", "label"]).to_pylist()
    labels = {r["slide"]: r["label"] for r in m if r["split"] == "test"}
    slides = sorted(
        p for p in (demo / "slides").iterdir() if p.stem in labels and p.suffix in (".svs", ".tiff")
    )
    return slides, labels


def accuracy(profile: dict[str, Any], labels: dict[str, str]) -> tuple[float, float, int, int]:
    """(tile accuracy, slide accuracy, tiles, slides) of one :func:`profile_one` result."""
    classes = profile["classes"]
    hit = n = slide_hit = 0
    for stem, p in profile["probs"].items():
        y = classes.index(labels[stem])
        hit += int((p.argmax(1) == y).sum())
        n += p.shape[0]
        slide_hit += int(int(p.mean(0).argmax()) == y)
    return hit / n, slide_hit / len(profile["probs"]), n, len(profile["probs"])


def main(argv: list[str] | None = None) -> int:
    from bench_predict import profile_one

    from sharding.magnification import display_mag

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--demo", required=True, help="folder of a finished `resdistill demo`")
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args(argv)
    demo = Path(args.demo).resolve()
    desc = json.loads((demo / "dataset" / "dataset.json").read_text())
    s_mag = desc["magnifications"][-1]
    from sharding.ray_cluster import ray_init

    ray_init(None)
    students = {
        "top": demo_models(demo)["distilled-cached"],
        "native": native_student(demo, native_dataset(demo, desc), s_mag),
    }
    slides, labels = demo_test_slides(demo)
    rows = []
    for trained, ckpt in students.items():
        for read in ("as-trained", "native"):
            prof = profile_one(ckpt, slides, read, batch=128)
            tile_acc, slide_acc, n, k = accuracy(prof, labels)
            rows.append({"trained_on": trained, "served": read, "tile_accuracy": tile_acc,
                         "slide_accuracy": slide_acc, "tiles": n, "slides": k,
                         "slides_per_hour": prof["slides_per_hour"]})  # fmt: skip
    print(f"student {display_mag(s_mag)} (distilled, cached targets) on {k} test slides, {n} tiles")
    print("| trained on (2.5x pixels from) | served with --read | tile accuracy | slide accuracy |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        src = "the 10x read, box-reduced" if r["trained_on"] == "top" else "the pyramid (native)"
        print(f"| {src} | {r['served']} | {r['tile_accuracy']:.3f} | {r['slide_accuracy']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    import ray

    ray.shutdown()
    return 0 if np.isfinite([r["tile_accuracy"] for r in rows]).all() else 1


if __name__ == "__main__":
    sys.exit(main())
