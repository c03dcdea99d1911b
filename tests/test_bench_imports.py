"""Every benchmark script still imports, and every library name it uses still exists.

The benchmarks are scripts no other test runs end to end, and most import the library inside
their functions, so an API the library drops (a command's ``add_arguments``, a module moved)
breaks them only when someone runs them. Cheap checks, no benchmark is run:

* each ``benchmarks/*.py`` imports (its top-level imports resolve);
* each ``from X import Y`` anywhere in it, function bodies included, finds ``Y``;
* each ``alias.attr`` on a ``resdistill`` or ``sharding`` module it imports exists.
"""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))
LIBRARY = ("resdistill", "sharding")


@pytest.fixture(autouse=True)
def _benchmarks_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scripts import each other by bare name (``from bench_rows import row``), as they do
    when run from ``benchmarks/``."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def test_every_benchmark_is_checked() -> None:
    assert {p.stem for p in SCRIPTS} >= {"run_all", "bench_train", "bench_serve", "bench_rows"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_imports(script: Path) -> None:
    importlib.import_module(f"benchmarks.{script.stem}")


def _imported(script: Path) -> tuple[list[str], dict[str, Any]]:
    """Problems with the script's ``import`` statements, and ``{local name: object}`` of every
    name they bind (in any scope)."""
    problems: list[str] = []
    names: dict[str, Any] = {}
    for node in ast.walk(ast.parse(script.read_text(), str(script))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                try:
                    module = importlib.import_module(alias.name)
                except ImportError as exc:
                    problems.append(f"line {node.lineno}: import {alias.name}: {exc}")
                    continue
                if alias.asname:
                    names[alias.asname] = module
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            try:
                module = importlib.import_module(node.module)
            except ImportError as exc:
                problems.append(f"line {node.lineno}: from {node.module}: {exc}")
                continue
            for alias in node.names:
                if hasattr(module, alias.name):
                    names[alias.asname or alias.name] = getattr(module, alias.name)
                    continue
                try:  # a submodule: ``from resdistill.commands import distill``
                    sub = importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    problems.append(
                        f"line {node.lineno}: from {node.module} import {alias.name}: no such name"
                    )
                    continue
                names[alias.asname or alias.name] = sub
    return problems, names


def _problems(script: Path) -> list[str]:
    """Every import of ``script`` that fails and every missing library attribute it uses."""
    problems, names = _imported(script)
    for node in ast.walk(ast.parse(script.read_text(), str(script))):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
            continue
        owner = names.get(node.value.id)
        if (
            isinstance(owner, types.ModuleType)
            and owner.__name__.split(".")[0] in LIBRARY
            and not hasattr(owner, node.attr)
        ):
            problems.append(f"line {node.lineno}: {owner.__name__} has no {node.attr!r}")
    return problems


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_names_exist(script: Path) -> None:
    problems = _problems(script)
    assert not problems, f"{script.name}:\n" + "\n".join(problems)


def test_the_check_sees_a_removed_name(tmp_path: Path) -> None:
    """The check itself: a function-local import of a removed name and a removed attribute of
    an imported command module are both reported."""
    script = tmp_path / "stale.py"
    script.write_text(
        "def f():\n"
        "    from resdistill.commands import distill\n"
        "    from resdistill.config import NoSuchConfig\n"
        "    return distill.add_arguments\n"
    )
    problems = _problems(script)
    assert len(problems) == 2, problems
    assert "NoSuchConfig" in problems[0] and "'add_arguments'" in problems[1]
