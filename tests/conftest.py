"""Shared pytest set-up: a private temp root for Ray and every test, 127.0.0.1 only.

Fixtures live in topic modules (``tests/fixtures_*.py``) registered below.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Ray must never bind a public interface nor ask for auth tokens in tests, and its session files go
# to a temp folder we remove. Set before any test imports ray.
_TMP = tempfile.mkdtemp(prefix="rdt-")
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TMPDIR", _TMP)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

pytest_plugins = [
    "tests.fixtures_ray",
    "tests.fixtures_s3",
    "tests.fixtures_slides",
    "tests.fixtures_data",
]
