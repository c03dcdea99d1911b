"""The one shape of a benchmark row, and a timer, shared by ``run_all.py`` and the scripts whose
rows it prints (each script's own ``main`` prints the same rows)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def row(
    name: str, baseline: str, base: float, ours_label: str, ours: float, unit: str,
    ratio: float, target: str = "", note: str = "",
) -> dict[str, Any]:  # fmt: skip
    """One table row: ``ratio`` is stated per row (ours/base or base/ours, as the name says)."""
    return {"row": name, "baseline": baseline, "baseline_value": base, "ours": ours_label,
            "ours_value": ours, "unit": unit, "ratio": ratio, "target": target, "note": note}  # fmt: skip


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds it took)``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere): ratios
    between models move with the CPU's vector units (AVX-512, AMX), so every run records it."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
