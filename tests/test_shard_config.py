"""``resdistill shard`` and ``resdistill synth`` options are their configs' fields: a YAML file
with flags over it, ``--print-config`` and a config built in Python agree, bad values are refused
naming the flag, and a run writes its options beside its outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from resdistill.cli import main as cli_main
from resdistill.commands import shard as shard_cmd
from resdistill.commands import synth as synth_cmd
from resdistill.commands.generate import parse
from resdistill.fields import ConfigError, from_plain
from resdistill.run_config import read_config_file
from sharding.options import IGNORE_CLASSES, ShardConfig, ShardOptions
from sharding.synthetic import SynthConfig
from tests.slide_factory import blob_image, write_slide

pytestmark = pytest.mark.timeout(300)


def test_config_file_with_a_flag_over_it(tmp_path: Path) -> None:
    """Defaults < the YAML file < the flags given; the result equals the config built in Python."""
    config = tmp_path / "shard.yaml"
    config.write_text(
        "slides: [a.svs, scans/]\nout: s3://bucket/ds\nmags: 20,10\ntile_px: 128\n"
        "classes: [tumor, benign]\nsplits: [0.5, 0.25, 0.25]\nresources: {shard: 1}\n"
        "progress: false\n"
    )
    got = parse(shard_cmd.SPEC, ["--config", str(config), "--tile-px", "64", "--format", "png"])
    assert got == ShardConfig(
        slides=("a.svs", "scans/"), out="s3://bucket/ds", mags="20,10", tile_px=64,
        classes=("tumor", "benign"), splits=(0.5, 0.25, 0.25), resources={"shard": 1.0},
        progress=False, fmt="png",
    )  # fmt: skip
    assert got.ignore_classes == IGNORE_CLASSES and got.quality == 90  # untouched: defaults
    # Slides given on the command line replace the file's.
    again = parse(shard_cmd.SPEC, ["--config", str(config), "b.svs"])
    assert again.slides == ("b.svs",) and again.tile_px == 128


def test_print_config_reads_back_equal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["shard", "x.svs", "--out", str(tmp_path / "o"), "--mags", "10,2.5", "--tile-px", "96",
            "--labels", "l.csv", "--annotations", "ann/", "--ignore-classes", "Pen,Ink*",
            "--resources", "shard=1,mem=2", "--workers", "0", "--no-progress"]  # fmt: skip
    assert cli_main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    cfg = parse(shard_cmd.SPEC, argv[1:])
    assert parse(shard_cmd.SPEC, ["--config", str(tmp_path / "printed.yaml")]) == cfg
    assert from_plain(ShardConfig, yaml.safe_load(printed), strict=True) == cfg
    assert cfg.annotation_options().ignore == ("Pen", "Ink*")


def test_python_and_cli_configs_are_equal() -> None:
    """The keyword form (run_shard's), Paths and lists included, equals the parsed flags."""
    cli = parse(shard_cmd.SPEC, ["a.svs", "--out", "ds", "--labels", "l.csv", "--splits", "1,0,0"])
    py = ShardConfig(slides=[Path("a.svs")], out=Path("ds"), labels=Path("l.csv"), splits=[1, 0, 0])
    assert py == cli
    assert ShardOptions.make() == ShardConfig(slides=("a",), out="o").shard_options()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mags": "5,10"}, "--mags: magnifications must be listed highest first"),
        ({"mags": "10,3"}, "--tile-px 224 at 10x gives"),
        ({"quality": 0}, "--quality must be 1..100"),
        ({"fmt": "webp"}, "--format must be one of jpeg, png"),
        ({"min_tissue": 1.5}, "--min-tissue must be within 0..1"),
        ({"mpp": 0.0}, "--mpp must be positive"),
        ({"shard_size": "huge"}, "--shard-size cannot read size"),
        ({"splits": (1, 1)}, "--splits takes three non-negative"),
        ({"annotated_only": True}, "--annotated-only needs --annotations"),
        ({"annotations": "a/", "min_label_fraction": 0}, "--min-label-fraction must be within"),
        ({"workers": -1}, "--workers must be 0 or more"),
    ],
)
def test_bad_values_name_their_flag(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ShardConfig(slides=("a.svs",), out="ds", **settings)


def test_a_run_writes_its_config_beside_the_dataset(tmp_path: Path) -> None:
    """``<out>/config.yaml`` holds the run's options (repeatable with ``--config``); the resume
    settings stay in ``_state/config.json``."""
    slide = write_slide(tmp_path / "s.svs", blob_image(1024, 768, seed=3), app_mag=40, mpp=0.25)
    out = tmp_path / "ds"
    argv = [str(slide), "--out", str(out), "--mags", "10,5", "--tile-px", "64", "--workers", "0",
            "--no-progress", "--shard-size", "1MB"]  # fmt: skip
    assert cli_main(["shard", *argv]) == 0
    assert (out / "_state" / "config.json").exists() and (out / "dataset.json").exists()
    doc = yaml.safe_load((out / "config.yaml").read_text())
    assert doc["resdistill"]["command"] == "shard" and "dataset" not in doc
    assert from_plain(ShardConfig, read_config_file(str(out / "config.yaml"))) == parse(
        shard_cmd.SPEC, argv
    )


def test_synth_config_file_flags_and_validation(tmp_path: Path) -> None:
    config = tmp_path / "synth.yaml"
    config.write_text("out: slides\ncohort: sites\nslides: 4\nsize_um: [300, 200]\n")
    got = parse(synth_cmd.SPEC, ["--config", str(config), "--seed", "3", "elsewhere"])
    assert got == SynthConfig(out="elsewhere", cohort="sites", slides=4, seed=3,
                              size_um=(300.0, 200.0))  # fmt: skip
    assert parse(synth_cmd.SPEC, ["o", "--size-um", "300x200"]).size_um == (300.0, 200.0)
    for settings, message in [
        ({"cohort": "scanner"}, "--cohort: unknown cohort 'scanner'"),
        ({"slides": 0}, "--slides must be at least 1"),
        ({"labeled_fraction": 1.5}, "--labeled-fraction must be within 0..1"),
        ({"size_um": (300.0,)}, "--size-um takes WxH"),
    ]:
        with pytest.raises(ConfigError, match=message):
            SynthConfig(out="o", **settings)
