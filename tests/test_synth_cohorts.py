"""Synthetic cohorts (``resdistill synth --cohort``): each is deterministic per seed, ``default``
is today's generator unchanged, and each of the others differs from it exactly as described:
``sites`` in staining only (the site is learnable from colour), ``subtle`` in atypical nuclei
only (a weaker low-magnification cue, the same high-magnification detail), ``unlabeled`` in its
labelled share only, ``chromatin`` in atypical nuclei (no low-magnification cue at all) and in
its scanners' optics (blur, shading), never in staining."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import openslide
import pytest

from resdistill.cli import main
from resdistill.fields import from_plain
from resdistill.run_config import read_config_file
from sharding.synthetic import (
    CLASSES,
    COHORTS,
    LABELS_CSV,
    REFERENCE,
    SITE_COLUMN,
    TRUTH_CSV,
    SynthConfig,
    box_downsample,
    cohort_named,
    make_scene,
    slide_plan,
    write_synthetic_slides,
)
from sharding.synthetic.cohorts import (
    BLUR_UM,
    CHROMATIN_CUES,
    HUE_SPREAD,
    SHADING,
    STRENGTH_SPREAD,
    SUBTLE_CUES,
)
from sharding.synthetic.optics import Optics

TINY_UM = (200.0, 160.0)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _pixels(path: Path, level: int = 0) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as slide:
        size = slide.level_dimensions[level]
        return np.asarray(slide.read_region((0, 0), level, size).convert("RGB"))


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _tiny_set(root: Path, cohort: str, seed: int = 3) -> list[str]:
    """Pixel digests of four tiny slides (one per class) of ``cohort``, read through OpenSlide."""
    slides = write_synthetic_slides(root, 4, seed=seed, size_um=TINY_UM, cohort=cohort)
    return [_digest(_pixels(s.path)) for s in slides]


# ---------------------------------------------------------------------------------------------
# default = today's generator; every cohort deterministic per seed

#: Per-channel mean and standard deviation (8-bit levels) of
#: ``make_scene(label, seed=7, index=i, size_um=(300, 300)).render`` of the 96 px square at
#: 0.25 um/px centred on the first island, recorded before cohorts existed. Statistics, not a
#: digest: another CPU's vector ``exp`` may move a pixel by one level (1e-4 of a mean), while any
#: change of the generator moves them by far more than the tolerance.
TODAY = {
    "benign": ((192.089, 139.643, 186.133), (45.181, 36.429, 21.444)),
    "glandular": ((190.27, 133.36, 181.534), (45.559, 35.964, 21.799)),
    "atypia": ((186.778, 130.715, 179.955), (48.718, 36.378, 22.438)),
    "inflamed": ((147.051, 108.515, 165.688), (69.989, 55.88, 36.053)),
}


@pytest.mark.parametrize("cohort", [None, "default"])
def test_default_cohort_renders_todays_pixels(cohort):
    for i, label in enumerate(CLASSES):
        kwargs = {} if cohort is None else {"cohort": cohort}
        scene = make_scene(label, seed=7, index=i, size_um=(300.0, 300.0), **kwargs)
        isl = scene.islands[0]
        pixels = scene.render(int(isl.cx / 0.25) - 48, int(isl.cy / 0.25) - 48, 96, 96, 0.25)
        flat = pixels.reshape(-1, 3).astype(np.float64)
        mean, std = TODAY[label]
        np.testing.assert_allclose(flat.mean(0), mean, atol=0.01, err_msg=label)
        np.testing.assert_allclose(flat.std(0), std, atol=0.01, err_msg=label)


@pytest.fixture(scope="module")
def default_tiny(tmp_path_factory) -> list[str]:
    return _tiny_set(tmp_path_factory.mktemp("default"), "default")


@pytest.mark.parametrize("cohort", ["default", "sites", "subtle", "unlabeled"])
def test_each_cohort_is_deterministic_and_changes_only_its_part(tmp_path, cohort, default_tiny):
    first = _tiny_set(tmp_path / "a", cohort)
    assert _tiny_set(tmp_path / "b", cohort) == first
    assert (tmp_path / "a" / TRUTH_CSV).read_bytes() == (tmp_path / "b" / TRUTH_CSV).read_bytes()
    other_seed = _tiny_set(tmp_path / "c", cohort, seed=4)
    assert all(a != b for a, b in zip(first, other_seed, strict=True))
    same = [a == b for a, b in zip(first, default_tiny, strict=True)]
    expected = {
        "default": [True] * 4,
        "sites": [False] * 4,  # every slide is stained by its site
        "subtle": [label != "atypia" for label in CLASSES],  # only atypical nuclei change
        "unlabeled": [True] * 4,  # the same slides; only labels.csv differs
    }[cohort]
    assert same == expected
    truth = _read_csv(tmp_path / "a" / TRUTH_CSV)
    assert list(truth[0]) == ["slide", "label", "patient", *([SITE_COLUMN] * (cohort == "sites"))]
    labels = _read_csv(tmp_path / "a" / LABELS_CSV)
    assert list(labels[0]) == ["slide", "label", "patient"]  # the labels contract is kept
    assert len(labels) == {"unlabeled": 1}.get(cohort, 4)  # round(0.25 * 4)


# ---------------------------------------------------------------------------------------------
# sites: a batch effect that is nuisance, not signal


def test_site_stainings_differ_in_every_property_and_keep_the_tissue():
    sites = COHORTS["sites"]
    assert sites.sites == 3
    stains = [sites.staining(0, k) for k in range(sites.sites)]
    assert stains == [sites.staining(0, k) for k in range(sites.sites)]  # deterministic
    assert stains != [sites.staining(1, k) for k in range(sites.sites)]  # per seed

    grey = np.ones(3) / math.sqrt(3)

    def hue(v) -> float:
        p = np.asarray(v) - (np.asarray(v) @ grey) * grey
        return math.degrees(math.atan2(np.cross(grey, p) @ np.array([1, 0, 0]), p[0]))

    for a, b in itertools.combinations(stains, 2):
        for s in ("h_strength", "e_strength"):  # at least 1/3 of the spread apart
            gap = abs(math.log(getattr(a, s)) - math.log(getattr(b, s)))
            assert gap >= STRENGTH_SPREAD / 3 - 1e-9, s
        for s in ("h_od", "e_od"):
            assert abs(hue(getattr(a, s)) - hue(getattr(b, s))) > HUE_SPREAD / 3 - 1.0, s
    with pytest.raises(ValueError, match="site"):
        sites.staining(0, 3)
    # the site changes the staining only: with the reference staining, a slide's pixels are the
    # default cohort's (same tissue, glands, nuclei and slide stain jitter)
    for i, label in enumerate(CLASSES):
        kw = {"seed": 5, "index": i, "size_um": (300.0, 300.0)}
        site = make_scene(label, cohort="sites", site=i % 3, **kw)
        plain = make_scene(label, **kw)
        assert site.staining != REFERENCE
        region = (200, 200, 128, 128, 0.5)
        assert np.array_equal(dataclasses.replace(site, staining=REFERENCE).render(*region),
                              plain.render(*region))  # fmt: skip


def _site_features(slides) -> np.ndarray:
    """Per slide, from its lowest level read through OpenSlide: the direction of the tissue's
    mean optical density (hue) and the OD of its lighter quarter (the stroma's eosin), each
    minus its class mean over the set (what is left when the class is known)."""
    feats = []
    for s in slides:
        with openslide.OpenSlide(str(s.path)) as slide:
            level = slide.level_count - 1
            (w, h), ds = slide.level_dimensions[level], slide.level_downsamples[level]
        rgb = _pixels(s.path, level).astype(np.float32)
        xs = ((np.arange(w) + 0.5) * s.mpp * ds).astype(np.float32)
        ys = ((np.arange(h) + 0.5) * s.mpp * ds).astype(np.float32)
        inside = s.scene().tissue(xs, ys, grid=True) > 0.999
        od = -np.log(np.clip(rgb[inside], 1, 255) / 255)
        mean = od.mean(0)
        feats.append(np.concatenate([mean / np.linalg.norm(mean), np.quantile(od, 0.25, axis=0)]))
    feats = np.array(feats)
    labels = np.array([s.label for s in slides])
    for label in CLASSES:
        feats[labels == label] -= feats[labels == label].mean(0)
    return feats


def _leave_one_out_site_accuracy(feats: np.ndarray, sites: np.ndarray) -> float:
    """Share of slides whose nearest site centroid (of the other slides) is their own site."""
    hits = 0
    for i in range(len(feats)):
        rest = np.arange(len(feats)) != i
        centroids = [feats[rest & (sites == k)].mean(0) for k in np.unique(sites)]
        hits += int(np.argmin([np.linalg.norm(feats[i] - c) for c in centroids]) == sites[i])
    return hits / len(feats)


def test_sites_are_balanced_and_their_stain_is_learnable_from_colour(tmp_path):
    """24 slides, one per patient: every site scans every class twice, and a slide's site is
    told from its colour (class removed) far above chance; in the default cohort it is not."""
    kw = {"seed": 0, "size_um": (480.0, 384.0), "base_mags": (20,), "slides_per_patient": 1}
    slides = write_synthetic_slides(tmp_path / "sites", 24, cohort="sites", **kw)
    truth = _read_csv(tmp_path / "sites" / TRUTH_CSV)
    assert [r[SITE_COLUMN] for r in truth] == [f"S{s.site}" for s in slides]
    assert Counter((r["label"], r[SITE_COLUMN]) for r in truth) == {
        (label, f"S{k}"): 2 for label in CLASSES for k in range(3)
    }
    patients = {}
    for s in slides:  # a patient's slides come from one site
        assert patients.setdefault(s.patient, s.site) == s.site
    # the first slide of each class (the first labelled) come from different sites
    assert [s.site for s in slides[:3]] == [0, 1, 2]
    sites = np.array([s.site for s in slides])
    accuracy = _leave_one_out_site_accuracy(_site_features(slides), sites)
    assert accuracy >= 0.85, accuracy  # chance: 1/3

    plain = write_synthetic_slides(tmp_path / "default", 24, **kw)
    same_plan = np.array([p["site"] for p in slide_plan(24, 0, slides_per_patient=1, sites=3)])
    assert np.array_equal(same_plan, sites)
    control = _leave_one_out_site_accuracy(_site_features(plain), same_plan)
    assert control <= 0.6, control


# ---------------------------------------------------------------------------------------------
# subtle: atypia's low-magnification cue is weaker, its high-magnification detail is kept


def _region(label: str, cohort: str, size_px: int = 1024, mpp: float = 0.25,
            optics: Optics | None = None) -> np.ndarray:  # fmt: skip
    scene = make_scene(label, seed=11, index=2, size_um=(1500.0, 1200.0), cohort=cohort)
    if optics is not None:
        scene = dataclasses.replace(scene, optics=optics)
    island = max(scene.islands, key=lambda i: i.sx * i.sy)
    x, y = int(island.cx / mpp) - size_px // 2, int(island.cy / mpp) - size_px // 2
    return scene.render(x, y, size_px, size_px, mpp)


def _nuclear_texture(img: np.ndarray) -> float:
    """Mean |Laplacian| of grey over dark (nuclear) pixels: chromatin and contour detail."""
    g = img.astype(np.float32).mean(-1)
    lap = np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:])
    return float(lap[g[1:-1, 1:-1] < 150].mean())


def test_subtle_atypia_darkens_a_third_as_much_at_low_magnification():
    assert COHORTS["subtle"].cues == SUBTLE_CUES
    assert SUBTLE_CUES.atypia_scale < 1.4 and SUBTLE_CUES.atypia_h < 1.35  # benign: 1.35
    shift, detail = {}, {}
    for cohort in ("default", "subtle"):
        benign, atypia = _region("benign", cohort), _region("atypia", cohort)
        # 40x -> 5x: how much darker atypical tissue is, in grey levels (the low-mag cue)
        shift[cohort] = box_downsample(benign, 8).mean() - box_downsample(atypia, 8).mean()
        detail[cohort] = _nuclear_texture(atypia) / _nuclear_texture(benign)
    assert 8.0 < shift["default"] < 14.0, shift
    assert 0.2 * shift["default"] < shift["subtle"] < 0.45 * shift["default"], shift
    assert detail["subtle"] > 1.5 and detail["subtle"] >= 0.95 * detail["default"], detail


# ---------------------------------------------------------------------------------------------
# unlabeled, names, the command


def test_unlabeled_cohort_from_the_command(tmp_path, capsys):
    out = tmp_path / "u"
    tiny = ["--size-um", "160x128", "--workers", "1"]
    assert main(["synth", str(out), "--cohort", "unlabeled", *tiny]) == 0
    truth, labels = _read_csv(out / TRUTH_CSV), _read_csv(out / LABELS_CSV)
    assert len(truth) == COHORTS["unlabeled"].slides == 24
    assert len(labels) == 6 == round(COHORTS["unlabeled"].labeled_fraction * 24)
    assert {r["label"] for r in labels} == set(CLASSES)
    assert labels == truth[:6]
    written = from_plain(SynthConfig, read_config_file(str(out / "config.yaml")))
    assert written == SynthConfig(str(out), cohort="unlabeled", size_um=(160.0, 128.0), workers=1)
    # explicit options win over the cohort's defaults
    out2 = tmp_path / "u2"
    options = ["--slides", "8", "--labeled-fraction", "0.5", *tiny]
    assert main(["synth", str(out2), "--cohort", "unlabeled", *options]) == 0
    assert (len(_read_csv(out2 / TRUTH_CSV)), len(_read_csv(out2 / LABELS_CSV))) == (8, 4)
    assert "cohort unlabeled" in capsys.readouterr().err  # the console writes to stderr
    with pytest.raises(SystemExit) as bad:  # an option error: argparse's exit status 2
        main(["synth", str(tmp_path / "x"), "--cohort", "scanner"])
    assert bad.value.code == 2
    assert not (tmp_path / "x").exists()


def test_sites_cohort_default_size_puts_every_class_at_every_site():
    n = COHORTS["sites"].slides
    plan = slide_plan(n, seed=0, sites=3)  # two slides per patient, as the command writes
    assert Counter((p["label"], p["site"]) for p in plan) == {
        (label, k): 2 for label in CLASSES for k in range(3)
    }
    sites_of = {}
    for p in plan:
        assert sites_of.setdefault(p["patient"], p["site"]) == p["site"]


def test_cohorts_combine_by_name():
    both = cohort_named("sites+subtle+unlabeled")
    assert (both.sites, both.cues, both.slides, both.labeled_fraction) == (3, SUBTLE_CUES, 24, 0.25)
    assert cohort_named("default+sites").sites == 3
    with pytest.raises(ValueError, match="unknown cohort"):
        cohort_named("sites+nope")


# ---------------------------------------------------------------------------------------------
# chromatin: atypia by chromatin texture alone; scanners that differ in optics, not stain


def test_chromatin_cohort_from_the_command_is_deterministic_with_optics_sites(tmp_path):
    tiny = ["--size-um", "200x160", "--workers", "1", "--slides", "4", "--seed", "3"]
    digests = []
    for run in ("a", "b"):
        assert main(["synth", str(tmp_path / run), "--cohort", "chromatin", *tiny]) == 0
        digests.append([_digest(_pixels(p)) for p in sorted((tmp_path / run).glob("synth_*"))])
    assert digests[0] == digests[1] and len(digests[0]) == 4
    other = _tiny_set(tmp_path / "c", "chromatin", seed=4)
    assert all(a != b for a, b in zip(digests[0], other, strict=True))
    truth = _read_csv(tmp_path / "a" / TRUTH_CSV)
    assert list(truth[0]) == ["slide", "label", "patient", SITE_COLUMN]
    chromatin = COHORTS["chromatin"]
    assert (chromatin.sites, chromatin.slides, chromatin.cues) == (3, 24, CHROMATIN_CUES)
    optics = [chromatin.optics(3, k) for k in range(3)]
    assert optics == [chromatin.optics(3, k) for k in range(3)]  # deterministic
    assert sorted(o.blur_um for o in optics) == pytest.approx([0, BLUR_UM / 2, BLUR_UM])
    assert sorted(o.shading for o in optics) == pytest.approx([0, SHADING / 2, SHADING])
    assert [chromatin.staining(3, k) for k in range(3)] == [REFERENCE] * 3  # one staining
    assert COHORTS["sites"].optics(3, 1).ideal  # the stain cohort keeps ideal optics
    with pytest.raises(ValueError, match="site effects"):
        cohort_named("sites+chromatin")
    with pytest.raises(ValueError, match="nuclear cues"):
        cohort_named("subtle+chromatin")


def test_chromatin_sites_change_the_optics_only():
    """With ideal optics a chromatin slide of another class than atypia is the default
    cohort's; blur softens and shading darkens, both fixed to slide coordinates."""
    kw = {"seed": 5, "size_um": (300.0, 300.0)}
    region = (200, 200, 128, 128, 0.5)
    for i, label in enumerate(CLASSES):
        scene = make_scene(label, cohort="chromatin", site=i % 3, index=i, **kw)
        ideal = dataclasses.replace(scene, optics=Optics())
        plain = make_scene(label, index=i, **kw)
        assert np.array_equal(ideal.render(*region), plain.render(*region)) == (label != "atypia")
    scene = make_scene("benign", index=0, **kw)
    sharp = scene.render(*region, sensor_noise=False).astype(np.float32)
    soft = dataclasses.replace(scene, optics=Optics(blur_um=BLUR_UM)).render(
        *region, sensor_noise=False).astype(np.float32)  # fmt: skip
    assert np.abs(np.diff(soft, axis=1)).mean() < 0.8 * np.abs(np.diff(sharp, axis=1)).mean()
    assert abs(soft.mean() - sharp.mean()) < 1.0  # blur moves no light
    lit = dataclasses.replace(scene, optics=Optics(shading=SHADING)).render(
        *region, sensor_noise=False).astype(np.float32)  # fmt: skip
    assert lit.mean() < sharp.mean() - 1.0


def test_chromatin_atypia_has_no_low_magnification_cue_and_blur_erases_its_detail():
    """Atypia and benign tissue are equally dark at 5x (against ~10 grey levels in the default
    cohort), while atypia's nuclear detail at 40x stays; the blurriest scanner erases part of
    that detail: the cue is high-magnification only, and site-dependent."""
    ideal = Optics()
    benign = _region("benign", "chromatin", optics=ideal)
    atypia = _region("atypia", "chromatin", optics=ideal)
    shift = box_downsample(benign, 8).mean() - box_downsample(atypia, 8).mean()
    assert abs(shift) < 1.0, shift
    detail = _nuclear_texture(atypia) / _nuclear_texture(benign)
    assert detail > 1.5, detail
    blurred = Optics(blur_um=BLUR_UM)
    soft = _nuclear_texture(_region("atypia", "chromatin", optics=blurred))
    soft_ratio = soft / _nuclear_texture(_region("benign", "chromatin", optics=blurred))
    assert soft_ratio < detail - 0.2, (soft_ratio, detail)
