"""Heatmap pictures a pathologist can read (:mod:`resdistill.predict.heatmaps`), and
magnifications named as users write them (2.5x, not 2p5x) in the evaluation's table and plots.

A picture's slide image lies unresampled at ``(LEFT_PX, TOP_PX)`` of its PNG, so a tile's pixels
are checked against the blend formula ``(1 - a) * background + a * colour`` at its centre.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from resdistill.predict import heatmap_frame, heatmaps
from resdistill.predict.heatmap_frame import scale_bar
from resdistill.predict.heatmaps import (
    DEFAULT_HEATMAP_PX,
    EDGE_LIGHTEN,
    LEFT_PX,
    TOP_PX,
    heatmap_pngs,
)
from resdistill.predict.outlines import CLASS_COLOURS, draw_outlines
from sharding.annotations import Outline

CLASSES = ["Normal", "Tumor", "Stroma"]
H, W = 300, 400  # the background picture
SCALE = 8  # level-0 pixels per picture pixel
SIZE0 = 160  # tile side in level-0 pixels: 20 picture pixels


def background() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(120, 250, size=(H, W, 3), dtype=np.uint8)


def tiles(rows: int = 10, cols: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A grid of tiles from level-0 (400, 320), each with random probabilities."""
    ys, xs = np.mgrid[0:rows, 0:cols]
    xs, ys = 400 + xs.ravel() * SIZE0, 320 + ys.ravel() * SIZE0
    probs = np.random.default_rng(1).dirichlet([1.0] * len(CLASSES), size=len(xs))
    return xs, ys, probs


def decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def image_area(picture: np.ndarray, h: int = H, w: int = W) -> np.ndarray:
    return picture[TOP_PX : TOP_PX + h, LEFT_PX : LEFT_PX + w]


def centre(x: int, y: int) -> tuple[int, int]:
    """Picture (column, row) of the centre of the tile at level-0 (x, y)."""
    return (x + SIZE0 // 2) // SCALE, (y + SIZE0 // 2) // SCALE


def blended(bg: np.ndarray, colour: np.ndarray, a: float) -> np.ndarray:
    return (1 - a) * bg.astype(float) + a * np.asarray(colour, dtype=float)


def pictures(bg: np.ndarray | None = None, **kw) -> dict[str, bytes]:
    xs, ys, probs = tiles()
    bg = background() if bg is None else bg
    args = {"slide_id": "slide-7", "mag": "2p5x", "which": ["Tumor", "classes"], **kw}
    return heatmap_pngs(bg, (W * SCALE, H * SCALE), xs, ys, SIZE0, probs, CLASSES, **args)


def figures(monkeypatch: pytest.MonkeyPatch, **kw) -> dict:
    """What :func:`heatmap_pngs` frames each picture with, by name: ``texts`` (title, subtitle,
    the scale bar's label), ``legend`` (the legend's labels), ``colorbar`` (its label or None)."""
    drawn: list = []

    def record(img, title, subtitle, entries, *, colorbar, scale_um_per_px):
        scale = [] if not scale_um_per_px else [scale_bar(img.shape[1], scale_um_per_px)[1]]
        drawn.append({
            "texts": [title, subtitle, *scale], "legend": [e.label for e in entries],
            "colorbar": f"P({colorbar[0]})" if colorbar else None,
        })  # fmt: skip
        return np.zeros((1, 1, 3), np.uint8)

    monkeypatch.setattr(heatmap_frame, "frame", record)
    names = list(pictures(**kw))
    monkeypatch.undo()
    return dict(zip(names, drawn, strict=True))


def test_per_class_picture_paints_the_colormap_of_each_probability() -> None:
    bg = background()
    xs, ys, probs = tiles()
    png = pictures(which=["Tumor"])["Tumor"]
    pic = decode(png)
    # the image area is the background's size; the colorbar takes 126 px, the title band 76
    assert pic.shape[:2] == (H + 76, W + 126)
    area = image_area(pic)
    viridis = matplotlib.colormaps["viridis"]
    for x, y, p in zip(xs, ys, probs, strict=True):
        cx, cy = centre(int(x), int(y))
        want = blended(bg[cy, cx], np.array(viridis(p[1])[:3]) * 255, 0.55)
        np.testing.assert_allclose(area[cy, cx], want, atol=1.0)
    # outside every tile: the background, untouched
    assert np.array_equal(area[: 320 // SCALE - 1], bg[: 320 // SCALE - 1])
    assert np.array_equal(area[:, : 400 // SCALE - 1], bg[:, : 400 // SCALE - 1])


def test_class_map_paints_the_argmax_class_colour() -> None:
    bg = background()
    xs, ys, probs = tiles()
    for confidence in (False, True):
        png = pictures(which=["classes"], confidence_opacity=confidence)["classes"]
        area = image_area(decode(png))
        for x, y, p in zip(xs, ys, probs, strict=True):
            cx, cy = centre(int(x), int(y))
            a = 0.55 * p.max() if confidence else 0.55
            want = blended(bg[cy, cx], CLASS_COLOURS[int(p.argmax())], a)
            np.testing.assert_allclose(area[cy, cx], want, atol=1.0)


def test_tile_edges_are_drawn_when_tiles_are_big_enough() -> None:
    xs, ys, probs = tiles()
    big = {"Tumor": image_area(decode(pictures(which=["Tumor"])["Tumor"]))}
    viridis = matplotlib.colormaps["viridis"]
    bg = background()
    i = 16  # row 1, column 1 of the grid: its top left pixel is on its top and left edges
    x0, y0 = int(xs[i]) // SCALE, int(ys[i]) // SCALE
    colour = np.array(viridis(probs[i, 1])[:3]) * 255
    for px, py, edge in ((x0 + 5, y0 + 5, False), (x0 + 5, y0, True), (x0, y0 + 5, True)):
        want = np.floor(blended(bg[py, px], colour, 0.55) + 0.5)
        if edge:
            want = want + EDGE_LIGHTEN * (255 - want)
        np.testing.assert_allclose(big["Tumor"][py, px], want, atol=1.0)
    # 4 px tiles (a 5x smaller slide picture): no edges, every tile pixel the blend
    small = image_area(decode(pictures(background()[:60, :80], which=["Tumor"])["Tumor"]), 60, 80)
    owner_rows = small[320 // 40 : 320 // 40 + 40, 400 // 40 : 400 // 40 + 60]
    assert owner_rows.shape == (40, 60, 3)
    p = probs[:, 1].reshape(10, 15)
    want = blended(
        background()[8:48, 10:70], np.repeat(np.repeat(viridis(p)[..., :3] * 255, 4, 0), 4, 1), 0.55
    )
    np.testing.assert_allclose(owner_rows, want, atol=1.0)


def test_escalated_tiles_are_hatched_and_named_in_the_legend(monkeypatch) -> None:
    xs, ys, probs = tiles()
    escalated = probs.max(axis=1) < 0.6
    assert 0 < escalated.sum() < len(xs)
    plain = {k: image_area(decode(v)) for k, v in pictures().items()}
    marked = {k: image_area(decode(v)) for k, v in pictures(escalated=escalated).items()}
    for name in ("Tumor", "classes"):
        for x, y, esc in zip(xs, ys, escalated, strict=True):
            x0, y0 = int(x) // SCALE + 1, int(y) // SCALE + 1  # inside the edge lines
            a = plain[name][y0 : y0 + 18, x0 : x0 + 18].astype(int)
            b = marked[name][y0 : y0 + 18, x0 : x0 + 18].astype(int)
            if esc:  # a quarter of the pixels darkened to 15%
                assert np.abs(a - b).mean() > 15
            else:
                assert np.array_equal(a, b)
    figs = figures(monkeypatch, escalated=escalated)
    n = int(escalated.sum())
    for fig in figs.values():
        assert f"escalated to the teacher ({n})" in legend_texts(fig)
        assert f"{len(xs)} tissue tiles, {n} escalated to the teacher" in texts(fig)


def texts(fig) -> list[str]:
    return fig["texts"]


def legend_texts(fig) -> list[str]:
    return fig["legend"]


def test_titles_colorbar_and_legend_name_slide_class_and_magnification(monkeypatch) -> None:
    figs = figures(monkeypatch)
    assert "slide-7: P(Tumor) per tile at 2.5x" in texts(figs["Tumor"])
    assert figs["Tumor"]["colorbar"] == "P(Tumor)" and figs["classes"]["colorbar"] is None
    assert "slide-7: predicted class per tile at 2.5x" in texts(figs["classes"])
    assert legend_texts(figs["classes"]) == CLASSES
    assert not any("2p5x" in t for fig in figs.values() for t in texts(fig))
    # drawn: dark title pixels in the band above the image, each class's swatch in the legend
    pic = decode(pictures(which=["classes"])["classes"])
    assert (pic[: TOP_PX - 4, LEFT_PX : LEFT_PX + 200].max(axis=2) < 80).sum() > 100
    legend = pic[TOP_PX : TOP_PX + 120, LEFT_PX + W :]
    for colour in CLASS_COLOURS[: len(CLASSES)]:
        assert (legend == colour).all(axis=2).sum() > 50


def test_outlines_are_drawn_over_every_picture_and_named(monkeypatch) -> None:
    ring = np.array([[800, 800], [2400, 800], [2400, 2000], [800, 2000], [800, 800]], float)
    outlines = [Outline("Tumor", "class", [ring]), Outline("region of interest", "roi", [ring])]
    size = (W * SCALE, H * SCALE)
    bare = image_area(decode(pictures(which=["Tumor"])["Tumor"]))
    drawn = image_area(decode(pictures(which=["Tumor"], outlines=outlines)["Tumor"]))
    assert np.array_equal(drawn, draw_outlines(bare, size, outlines, CLASSES))
    assert not np.array_equal(drawn, bare)
    legend = legend_texts(figures(monkeypatch, outlines=outlines)["classes"])
    assert legend[-2:] == ["Tumor (annotation)", "region of interest"]


def test_scale_bar_and_sizes_around_the_image(monkeypatch) -> None:
    # mpp 0.25 at level 0: 2 um a picture pixel; a sixth of 400 px is 133 um -> a 100 um bar
    fig = figures(monkeypatch, mpp=0.25)["Tumor"]
    assert "100 µm" in texts(fig)
    pic = decode(pictures(which=["Tumor"], mpp=0.25)["Tumor"])
    assert pic.shape[:2] == (H + 76 + 30, W + 126)
    bar_row = pic[TOP_PX + H + 15, LEFT_PX + 1 : LEFT_PX + 49]
    assert (bar_row.max(axis=1) < 60).all()  # a black bar 50 px (100 um) long


def test_real_slide_picture_at_the_default_size(real_slide: Path) -> None:
    import openslide

    with openslide.OpenSlide(str(real_slide)) as slide:
        width, height = slide.dimensions
        bg = np.asarray(slide.get_thumbnail((DEFAULT_HEATMAP_PX,) * 2).convert("RGB"))
    assert max(bg.shape[:2]) == DEFAULT_HEATMAP_PX
    size0 = 224
    ys, xs = np.mgrid[0 : height - size0 : size0, 0 : width - size0 : size0]
    xs, ys = xs.ravel(), ys.ravel()
    probs = np.random.default_rng(2).dirichlet([1.0, 1.0], size=len(xs))
    pngs = heatmap_pngs(
        bg, (width, height), xs, ys, size0, probs, ["Normal", "Tumor"], slide_id="CMU-1",
        mag="1p25x", which=["Tumor", "classes"], escalated=probs.max(axis=1) < 0.6, mpp=0.499,
    )  # fmt: skip
    for name, png in pngs.items():
        pic = decode(png)
        h, w = bg.shape[:2]
        # the long side is the image's 1600 px plus the title band, the scale bar and the margin
        assert pic.shape[0] == DEFAULT_HEATMAP_PX + 76 + 30
        assert w + 126 <= pic.shape[1] <= w + 400, name
        area = image_area(pic, h, w)
        cx, cy = (int(xs[0]) + size0 // 2) * w // width, (int(ys[0]) + size0 // 2) * h // height
        assert np.abs(area[cy, cx].astype(int) - bg[cy, cx].astype(int)).max() > 3  # painted


def test_unknown_picture_name_is_refused() -> None:
    with pytest.raises(ValueError, match="neither a class"):
        pictures(which=["Tumour"])


def test_no_tiles_gives_the_bare_slide() -> None:
    empty = np.zeros(0, dtype=np.int64)
    pngs = heatmap_pngs(
        background(), (W * SCALE, H * SCALE), empty, empty, SIZE0, np.zeros((0, 3)), CLASSES,
        slide_id="s", mag="10x", which=["Tumor", "classes"],
    )  # fmt: skip
    for png in pngs.values():
        assert np.array_equal(image_area(decode(png)), background())


# -- magnifications as users write them ------------------------------------------------------


def two_model_report():
    """An evaluation of a 10x teacher and a 2.5x student (cards only, scored predictions)."""
    from resdistill.checkpoint import LoadedModel, ModelCard
    from resdistill.eval.evaluate import score_predictions
    from resdistill.eval.results import EvaluationReport, ModelEvaluation, TilePredictions

    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1, 0, 1, 0, 1], 10)  # one label per slide
    slides = np.repeat([f"s{i}" for i in range(6)], 10)
    models = []
    for name, mag, flops in (("teacher", "10x", 3.6e9), ("student", "2p5x", 2.3e8)):
        probs = np.clip(np.eye(2)[labels] * 0.6 + rng.random((60, 2)) * 0.4, 0, None)
        probs /= probs.sum(axis=1, keepdims=True)
        preds = TilePredictions([f"k{i}" for i in range(60)], slides, labels, probs)
        card = ModelCard(stage="student", arch="resnet18", classes=("Normal", "Tumor"), mag=mag)
        tile, slide = score_predictions(preds, ["Normal", "Tumor"], n_boot=20)
        compute = {"flops": flops, "params": 1.1e7, "images_per_s": 100.0}
        model = LoadedModel(None, card, f"/ckpt/{name}", name=name)
        models.append(ModelEvaluation(name, model, preds, tile, slide, compute))
    return EvaluationReport("/data", "test", models, n_boot=20, alpha=0.05, seed=0)


def test_evaluation_table_and_plots_say_2_5x() -> None:
    from rich.console import Console

    from resdistill.eval.plots import accuracy_vs_flops_figure, roc_figure
    from resdistill.eval.report_files import format_table

    report = two_model_report()
    console = Console(record=True, width=250)
    console.print(format_table(report))
    table = console.export_text()
    student = next(line for line in table.splitlines() if "student" in line)
    assert "2.5x" in student and "2p5x" not in table

    fig = accuracy_vs_flops_figure(report)
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["teacher (10x)", "student (2.5x)"]
    assert "2.5x" in [t.get_text() for t in ax.texts]
    roc = [t.get_text() for a in roc_figure(report).axes if a.get_legend() for t in
           a.get_legend().get_texts()]  # fmt: skip
    assert any(t.startswith("student 2.5x tiles AUC") for t in roc)
    assert not any("2p5x" in t for t in roc)


def test_tune_table_says_2_5x() -> None:
    from rich.console import Console

    from resdistill.tune.space import Domain
    from resdistill.tune.trials_table import TrialRow, TuneSummary, print_summary

    space = {"student_mag": Domain("choice", ("5x", "2p5x")),
             "lr": Domain("loguniform", (1e-4, 1e-2))}  # fmt: skip
    row = TrialRow("t1", "done", {"student_mag": "2p5x", "lr": 1e-3}, 2, 0.8, 0.9, 1, "/c")
    best = {"trial": "t1", "config": {"student_mag": "2p5x", "lr": 1e-3}, "value": 0.9,
            "epoch": 1, "checkpoint": "/c"}  # fmt: skip
    summary = TuneSummary("sweep", "/runs/sweep", "val_acc", "max", [row], best, False, 1.0)
    console = Console(record=True, width=200)
    print_summary(summary, space, console)
    text = console.export_text()
    assert "2.5x" in text and "2p5x" not in text
    assert "student_mag=2.5x" in text


def whole_figure(img, title, subtitle, entries, colorbar, um_per_px) -> np.ndarray:
    """The picture as one matplotlib figure of the frame's size, every part at the pixel offsets
    :mod:`resdistill.predict.heatmap_frame` documents: what its strips must add up to."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from resdistill.predict.heatmap_frame import CBAR_PX, GAP_PX, MARGIN_PX, SCALE_BAR_PX, column

    h, w = img.shape[:2]
    cbar_h = min(h, max(160, int(0.6 * h)))
    col = column(colorbar, cbar_h, entries)
    fw, fh = LEFT_PX + w + col.shape[1], max(TOP_PX + h + SCALE_BAR_PX + MARGIN_PX, col.shape[0])
    fig = Figure(figsize=(fw / 100, fh / 100), dpi=100)
    canvas = FigureCanvasAgg(fig)

    def at(x: float, y: float) -> tuple[float, float]:
        return x / fw, 1.0 - y / fh

    fig.text(*at(LEFT_PX, 10), title, va="top", ha="left", fontsize=15, weight="bold")
    fig.text(*at(LEFT_PX, 38), subtitle, va="top", ha="left", fontsize=11, color="0.25")
    x_col = LEFT_PX + w + GAP_PX
    left, top = at(x_col, TOP_PX)
    cax = fig.add_axes((left, top - cbar_h / fh, CBAR_PX / fw, cbar_h / fh))
    cmap = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colorbar[1])
    fig.colorbar(cmap, cax=cax).set_label(f"P({colorbar[0]})", fontsize=12)
    legend = fig.legend(handles=[heatmap_frame._handle(e) for e in entries], loc="upper left",
                        frameon=False, fontsize=11)  # fmt: skip
    legend.set_bbox_to_anchor(at(x_col, TOP_PX + cbar_h + GAP_PX), transform=fig.transFigure)
    px, label = scale_bar(w, um_per_px)
    (x0, y), (x1, _) = at(LEFT_PX, TOP_PX + h + 15), at(LEFT_PX + px, 0)
    fig.add_artist(Line2D([x0, x1], [y, y], color="black", lw=4, solid_capstyle="butt"))
    fig.text(x1 + 8 / fw, y, label, va="center", ha="left", fontsize=11)
    canvas.draw()
    out = np.array(np.asarray(canvas.buffer_rgba())[..., :3])
    out[TOP_PX : TOP_PX + h, LEFT_PX : LEFT_PX + w] = img
    return out


def test_framed_picture_is_the_whole_figure_and_kept_strips_are_fresh_ones() -> None:
    from resdistill.predict.heatmap_frame import Entry, column, frame, scale_strip

    ring = np.array([[800, 800], [2400, 800], [2400, 2000], [800, 2000], [800, 800]], float)
    outlines = [Outline("Tumor", "class", [ring]), Outline("region of interest", "roi", [ring])]
    entries = heatmaps._overlay_entries(CLASSES, 0, outlines)
    assert [e.label for e in entries] == ["Tumor (annotation)", "region of interest"]
    entries += (Entry("patch", CLASS_COLOURS[0], "Normal"),)
    args = (background(), "slide-7: P(Tumor) per tile at 2.5x", "150 tissue tiles", entries)
    want = whole_figure(*args, ("Tumor", "magma"), 0.5)
    column.cache_clear()
    for _ in range(2):  # drawn, then kept
        got = frame(*args, colorbar=("Tumor", "magma"), scale_um_per_px=0.5)
        assert np.array_equal(got, want)
    assert column.cache_info().hits == 1 and scale_strip.cache_info().hits >= 1
    cbar_h = min(H, max(160, int(0.6 * H)))
    fresh = column.__wrapped__(("Tumor", "magma"), cbar_h, entries)
    assert np.array_equal(column(("Tumor", "magma"), cbar_h, entries), fresh)
    assert not column(("Tumor", "magma"), cbar_h, entries).flags.writeable  # shared: read-only


def test_blend_is_the_formula_in_float32_everywhere() -> None:
    """Bit for bit ``round((1 - a) * bg + a * c)`` in float32 on painted pixels, the background
    elsewhere (blend computes only the painted rows and columns)."""
    from resdistill.predict.tile_paint import blend

    rng = np.random.default_rng(4)
    bg = rng.integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    owner = np.full((70, 90), -1, np.int32)
    owner[20:50, 30:80] = rng.integers(-1, 6, size=(30, 50))
    colours = rng.random((6, 3)) * 255
    for alpha in (0.55, rng.random(6)):
        a = np.broadcast_to(np.asarray(alpha, np.float32), (6,))[owner][..., None]
        c = colours.astype(np.float32)[owner]
        want = ((1.0 - a) * bg.astype(np.float32) + a * c + 0.5).astype(np.uint8)
        want[owner < 0] = bg[owner < 0]
        assert np.array_equal(blend(bg, owner, colours, alpha), want)
