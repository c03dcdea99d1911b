"""``resdistill synth``: synthetic H&E-like whole-slide images (SVS and tiled TIFF pyramids)."""

from __future__ import annotations

from resdistill.commands.generate import CommandSpec
from sharding.synthetic.config import SynthConfig

SPEC = CommandSpec(
    name="synth",
    config=SynthConfig,
    summary="write synthetic H&E-like whole-slide images (Aperio SVS and generic tiled TIFF)",
    description="""\
Tissue islands on glass with class-dependent morphology whose cues live at different scales, at
20x and 40x base magnification, plus labels.csv (slide,label,patient) for the labelled slides,
truth.csv with every slide's class (and scanning site, when the cohort has several), and the
options in OUT/config.yaml. Deterministic for a seed: the embedded demo and test data. --cohort
picks a kind of set that differs the way real cohorts do (scanning sites, subtle cues, many
unlabelled slides).

exit codes: 0 written; 2 unusable options.""",
    examples=(
        "resdistill synth slides/ --slides 8 --seed 1",
        "resdistill synth slides-sites/ --cohort sites+subtle --size-um 3000x2400",
    ),
)


def run(cfg: SynthConfig) -> int:
    """Write the slide set ``cfg`` describes and ``OUT/config.yaml``, print a table of its
    slides; 0 when done."""
    import time

    from rich.table import Table

    from resdistill.fields import to_plain
    from resdistill.run_config import write_run_config
    from sharding.progress import console
    from sharding.synthetic import site_name, synthesize

    start = time.monotonic()
    cohort = cfg.cohort_kind()
    slides = synthesize(cfg)
    write_run_config(cfg.out, "synth", to_plain(cfg))
    title = f"{len(slides)} synthetic slides of cohort {cohort.name} in {cfg.out}"
    table = Table(title=title, title_justify="left")
    cols = ["slide", "format", "base", "size (px)", "label", "patient", "labelled"]
    cols += ["site"] if cohort.sites > 1 else []
    for col in cols:
        table.add_column(col)
    for s in slides:
        row = [s.slide, s.format, f"{s.base_mag:g}x", f"{s.width}x{s.height}", s.label, s.patient]
        row += ["yes" if s.labeled else "no"]
        row += [site_name(s.site)] if cohort.sites > 1 else []
        table.add_row(*row)
    console.print(table)
    console.print(f"written in {time.monotonic() - start:.1f}s")
    return 0
