"""Draw the README's figure, and the predict page's heatmaps, from a finished ``resdistill demo``.

    resdistill demo --out demo
    python docs/figures/make_readme_figure.py --demo demo

Takes a test slide of the demo's dataset (the first by name, or ``--slide``), runs the real
``resdistill predict`` on it with the demo's distilled 2.5x student (the run folder
``runs/distilled``: its best checkpoint) and writes to ``--figures`` (default: this folder):

* ``readme-figure.png``: the last panel of the slide's QC picture from ``shard``
  (``dataset/_state/qc``: the regions kept, framed in blue) beside the student's class map with
  its legend, from ``predict``;
* ``predict-heatmap-classes.png`` and ``predict-heatmap-probability.png`` (the probability of
  the slide's predicted class): ``predict``'s own pictures of that slide.

Nothing is drawn by hand: both halves of the figure are the pipeline's own PNGs. The class maps
are saved as 256-colour PNGs to keep the repository small.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

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


def regions_panel(qc: Path) -> Any:
    """The QC picture's third panel: the regions kept over the faded thumbnail."""
    from PIL import Image

    from sharding.qc import GAP_PX

    picture = Image.open(qc).convert("RGB")
    width = (picture.width - 2 * GAP_PX) // 3
    return picture.crop((2 * (width + GAP_PX), 0, picture.width, picture.height))


def save_small(image: Any, out: Path) -> None:
    """``image`` as a 256-colour PNG."""
    image.convert("RGB").quantize(256).save(out, optimize=True)


def side_by_side(left: Any, right: Any, titles: tuple[str, str], out: Path) -> None:
    """Two PIL pictures at one height, each under its title, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    images = [im.convert("RGB") for im in (left, right)]
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    save_small(Image.open(buf), out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--demo", type=Path, required=True, help="the --out folder of resdistill demo")
    ap.add_argument("--slide", help="a test slide's id (default: the first test slide)")
    ap.add_argument("--model", default="distilled", help="a run of the demo's runs/ folder")
    ap.add_argument("--figures", type=Path, default=HERE, help="where the PNGs go")
    ap.add_argument("--heatmap-px", type=int, default=800, help="predict --heatmap-px")
    args = ap.parse_args(argv)
    from PIL import Image

    demo = args.demo.resolve()
    checkpoint = str(demo / "runs" / args.model)
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
        classes = Image.open(preds / f"{slide}.heatmap-classes.png")
        save_small(classes, args.figures / "predict-heatmap-classes.png")
        # a probability map keeps its colours: 256 of them would band its colour bar
        probability = Image.open(preds / f"{slide}.heatmap-{result['class']}.png")
        probability.convert("RGB").save(
            args.figures / "predict-heatmap-probability.png", optimize=True
        )
        side_by_side(
            regions_panel(qc), Image.open(preds / f"{slide}.heatmap-classes.png"),
            (f"shard: the regions kept of {slide}", f"predict: the {args.model} 2.5x student"),
            args.figures / "readme-figure.png",
        )  # fmt: skip
    print(f"wrote {args.figures / 'readme-figure.png'} and the predict-heatmap-*.png pictures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
