"""Draw the README's figure, and the predict page's heatmaps, from a finished ``resdistill demo``.

    resdistill demo --out demo
    python docs/figures/make_readme_figure.py --demo demo

Takes a test slide of the demo's dataset (the first by name, or ``--slide``), runs the real
``resdistill predict`` on it with the demo's distilled 2.5x student (``eval/demo.json`` names
its checkpoint), and writes to ``--figures`` (default: this folder):

* ``readme-figure.png``: the slide's QC picture from ``shard`` (``dataset/_state/qc``) beside
  the student's class map with its legend;
* ``predict-heatmap-classes.png`` and ``predict-heatmap-<class>.png``: ``predict``'s own
  pictures of that slide, unchanged.

Nothing is drawn by hand: both halves of the figure are the pipeline's own PNGs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_slide(demo: Path, name: str | None) -> tuple[str, Path]:
    """``(slide id, slide file)`` of the demo's test split: ``name``, else the first by id."""
    import pyarrow.parquet as pq

    manifest = pq.read_table(demo / "dataset" / "manifest.parquet", columns=["slide", "split"])
    ids = sorted({s for s, sp in zip(*manifest.to_pydict().values(), strict=True) if sp == "test"})
    if not ids:
        raise SystemExit(f"{demo}/dataset has no test slide")
    slide = name or ids[0]
    if slide not in ids:
        raise SystemExit(f"{slide} is not a test slide of {demo}: one of {', '.join(ids)}")
    files = [p for p in (demo / "slides").iterdir() if p.stem == slide]
    if len(files) != 1:
        raise SystemExit(f"{demo}/slides holds {len(files)} files for {slide}")
    return slide, files[0]


def side_by_side(left: Path, right: Path, titles: tuple[str, str], out: Path) -> None:
    """The two pictures at one height, each under its title, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in (left, right)]
    height = min(im.height for im in images)
    images = [im.resize((round(im.width * height / im.height), height), Image.LANCZOS)
              for im in images]  # fmt: skip
    width = sum(im.width for im in images)
    dpi = 100
    fig, axes = plt.subplots(
        1, 2, figsize=(width / dpi, height / dpi + 0.5), dpi=dpi,
        gridspec_kw={"width_ratios": [im.width for im in images], "wspace": 0.02},
    )  # fmt: skip
    for ax, im, title in zip(axes, images, titles, strict=True):
        ax.imshow(im)
        ax.set_title(title, fontsize=12)
        ax.axis("off")
    fig.savefig(out, dpi=dpi, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--demo", type=Path, required=True, help="the --out folder of resdistill demo")
    ap.add_argument("--slide", help="a test slide's id (default: the first test slide)")
    ap.add_argument("--model", default="distilled", help="a model name of eval/demo.json")
    ap.add_argument("--figures", type=Path, default=HERE, help="where the PNGs go")
    ap.add_argument("--heatmap-px", type=int, default=900, help="predict --heatmap-px")
    args = ap.parse_args(argv)
    demo = args.demo.resolve()
    checkpoint = json.loads((demo / "eval" / "demo.json").read_text())["models"][args.model]
    slide, path = test_slide(demo, args.slide)
    qc = demo / "dataset" / "_state" / "qc" / f"{slide}.png"
    with tempfile.TemporaryDirectory(prefix="rd-figure-") as tmp:
        preds = Path(tmp) / "predictions"
        cmd = ["resdistill", "predict", checkpoint, str(path), "--out", str(preds),
               "--heatmap", "all", "--heatmap-px", str(args.heatmap_px)]  # fmt: skip
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        result = json.loads((preds / f"{slide}.json").read_text())
        args.figures.mkdir(parents=True, exist_ok=True)
        for png in sorted(preds.glob(f"{slide}.heatmap-*.png")):
            shutil.copyfile(png, args.figures / png.name.replace(slide, "predict"))
        side_by_side(
            qc, preds / f"{slide}.heatmap-classes.png",
            (f"shard: tissue and regions kept ({slide})",
             f"predict: {args.model} student, slide class '{result['class']}'"),
            args.figures / "readme-figure.png",
        )  # fmt: skip
    print(f"wrote {args.figures / 'readme-figure.png'} and the predict-heatmap-*.png pictures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
