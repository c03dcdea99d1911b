"""The documentation does what it says: the site builds strictly, the benchmarks page is the
generator's output, the README keeps its shape and links, and the commands users paste (every
shell block of the getting-started page, the README's five-command quickstart among them) run.

The getting-started page is run as written, in an empty folder, on tiny synthetic slides: a
``resdistill`` shim first on ``PATH`` appends only the size flags the page itself lists (a later
flag overrides an earlier one) and records every command line it was given, so the test can
check that the README's quickstart ran verbatim.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GETTING_STARTED = ROOT / "docs" / "getting-started.md"
#: the README's first two commands (the demo, the test suite): CI runs the second exactly
DEMO_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && resdistill demo"
)
TEST_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test,onnx]' && "
    "python -m pytest -q"
)
#: flags appended per command when the docs run on tiny slides (getting-started lists them)
_TRAIN = shlex.split("--epochs 1 --batch-size 8 --arch resnet-small --workers 1 --loader-workers 1")
SIZE_FLAGS = {
    "synth": ["--size-um", "900x700"],
    "shard": ["--tile-px", "64", "--workers", "0"],
    "teacher": _TRAIN,
    "distill": _TRAIN,
    "evaluate": ["--n-boot", "50", "--bench-seconds", "0.2", "--bench-repeats", "1"],
    "predict": ["--heatmap-px", "400"],
}


def build_site(dest: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` of the repository's site into ``dest``."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(dest)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def fenced_blocks(markdown: str, lang: str) -> list[str]:
    """The bodies of the ```` ```lang ```` fenced blocks, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```$", markdown, flags=re.M | re.S)


def commands(block: str) -> list[str]:
    """A shell block's command lines (``\\`` continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")
    ]


def readme_quickstart() -> list[str]:
    """The commands of the README's "Your own slides in five commands" section."""
    text = README.read_text()
    section = text.split("## Your own slides in five commands", 1)[1].split("\n## ", 1)[0]
    (block,) = fenced_blocks(section, "bash")
    return commands(block)


def test_site_builds_strictly(tmp_path: Path) -> None:
    res = build_site(tmp_path / "site")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    site = tmp_path / "site"
    api = (site / "api" / "index.html").read_text()
    # the reference is generated: a config, one of its options with its --help text and default
    assert 'id="resdistill.config.TrainConfig"' in api
    assert "per-worker batch size" in api
    for page in ("getting-started", "shard", "predict", "results", "benchmarks", "changelog"):
        assert (site / page / "index.html").stat().st_size > 0, page
    # the changelog page is the repository's CHANGELOG.md, its links rebased onto the site
    changelog = (site / "changelog" / "index.html").read_text()
    assert "What changed, and what was measured when" in changelog
    assert 'href="../results/' in changelog


def test_benchmarks_page_is_generated() -> None:
    """``docs/benchmarks.md`` is what ``python benchmarks/to_docs.py`` writes from the runs."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from to_docs import PAGE, load_runs, render

    assert PAGE.read_text() == render(load_runs()), "run: python benchmarks/to_docs.py"


def test_recorded_benchmark_tables_read_back_exactly() -> None:
    """A table ``run_all.py --markdown`` printed, read back by ``to_docs``, prints the same."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run_all import markdown_table
    from to_docs import load_runs, rows_from_markdown

    for run in load_runs():
        header = (f"resdistill benchmarks ({'quick' if run['quick'] else 'full'}): "
                  f"{run['cores']} cores, load average "
                  f"{', '.join(f'{v:.1f}' for v in run['loadavg'])}")  # fmt: skip
        text = markdown_table(run["rows"], header)
        head, rows = rows_from_markdown(text)
        assert markdown_table(rows, header) == text
        assert head["cores"] == run["cores"]
        assert run.get("machine") and run.get("command"), run["file"]


def test_readme_is_a_short_guide_that_starts_with_the_two_commands() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 250
    commands_at_top = [line.strip() for line in lines[:10] if line.startswith("    ")]
    assert commands_at_top == [DEMO_COMMAND, TEST_COMMAND]
    ci = (ROOT / ".ci" / "run").read_text().rstrip().splitlines()
    assert ci[-1] == TEST_COMMAND, "CI's last line must be the README's test command"
    quick = readme_quickstart()
    assert [shlex.split(c)[1] for c in quick] == ["shard", "teacher", "distill", "evaluate",
                                                  "predict"]  # fmt: skip


def _links(markdown: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", markdown)


@pytest.mark.parametrize("name", ["README.md", "CHANGELOG.md"])
def test_repository_pages_link_only_to_what_exists(name: str) -> None:
    text = (ROOT / name).read_text()
    local = [link for link in _links(text) if "://" not in link and not link.startswith("#")]
    assert local, "no links found"
    missing = [link for link in local if not (ROOT / link.split("#")[0]).exists()]
    assert not missing, f"{name} links to missing files: {missing}"


def test_readme_flags_exist() -> None:
    """Every flag the README's quickstart passes is one its command's --help lists."""
    for line in readme_quickstart():
        words = shlex.split(line)
        res = subprocess.run([sys.executable, "-m", "resdistill", words[1], "--help"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert res.returncode == 0, res.stderr
        for flag in (w for w in words if w.startswith("--")):
            assert re.search(rf"(^|[\s,]){re.escape(flag)}\b", res.stdout), (words[1], flag)


def _shim(bin_dir: Path, log: Path) -> None:
    """A ``resdistill`` that records its arguments, then runs the real CLI with size flags."""
    bin_dir.mkdir()
    shim = bin_dir / "resdistill"
    shim.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "from resdistill.cli import main\n"
        f"SIZE = {json.dumps(SIZE_FLAGS)}\n"
        "if __name__ == '__main__':  # worker processes re-import this file\n"
        "    argv = sys.argv[1:]\n"
        f"    with open({str(log)!r}, 'a') as f:\n"
        "        f.write(json.dumps(argv) + '\\n')\n"
        "    sys.exit(main(argv + SIZE.get(argv[0] if argv else '', [])))\n"
    )
    shim.chmod(0o755)


@pytest.mark.slow
@pytest.mark.timeout(900)  # six commands, three of them starting a local Ray of their own
def test_getting_started_runs_and_holds_the_readme_quickstart(tmp_path: Path) -> None:
    page = GETTING_STARTED.read_text()
    blocks = fenced_blocks(page, "bash")
    page_commands = [c for b in blocks for c in commands(b)]
    quick = readme_quickstart()
    # the README's five commands are lines of the page, in order, so running it runs them
    positions = [page_commands.index(c) for c in quick]
    assert positions == sorted(positions), "README quickstart out of the page's order"
    # the size flags the test appends are the ones the page says it appends
    tested = page.split("## How this page is tested", 1)[1]
    for cmd, flags in SIZE_FLAGS.items():
        for flag in flags[::2]:
            assert flag in tested, f"getting-started does not list {cmd} {flag}"

    work, log = tmp_path / "work", tmp_path / "argv.jsonl"
    work.mkdir()
    _shim(tmp_path / "bin", log)
    script = tmp_path / "getting-started.sh"
    script.write_text("set -euo pipefail\n" + "\n".join(blocks))
    # As on a fresh machine: each command starts its own local Ray (no RAY_ADDRESS), in the
    # folder the user works in, so relative paths mean what they say.
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run(["bash", str(script)], cwd=work, env=env, capture_output=True,
                         text=True, timeout=840)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]

    ran = [json.loads(line) for line in log.read_text().splitlines()]
    for line in quick:
        assert shlex.split(line)[1:] in ran, f"not run verbatim: {line}"
    assert "slide,label,patient" in res.stdout  # `head -5 labels.csv` showed the format
    evaluation = json.loads((work / "evaluation" / "evaluation.json").read_text())
    assert len(evaluation["models"]) == 2
    slides = sorted(p.stem for p in (work / "slides").iterdir() if p.suffix in (".svs", ".tiff"))
    assert len(slides) == 8
    import pyarrow.parquet as pq

    predicted = pq.read_table(work / "predictions" / "slides.parquet").to_pydict()
    assert sorted(predicted["slide"]) == slides
    assert set(predicted["status"]) == {"ok"}
    assert list((work / "predictions").glob("*.heatmap-classes.png"))
    assert len(list((work / "dataset" / "_state" / "qc").glob("*.png"))) == 8
