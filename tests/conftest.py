"""Shared pytest set-up: a private temp root for Ray and every test, 127.0.0.1 only.

Fixtures live in topic modules (``tests/fixtures_*.py``) registered below.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

import pytest

# Ray must never bind a public interface nor ask for auth tokens in tests, and its session files go
# to a temp folder we remove. Set before any test imports ray.
_TMP = tempfile.mkdtemp(prefix="rdt-")
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TMPDIR", _TMP)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# per-user files the code keeps (tune's resume key) go to the temp root, not the runner's ~/.config
os.environ["XDG_CONFIG_HOME"] = os.path.join(_TMP, "config")

pytest_plugins = [
    "tests.fixtures_ray",
    "tests.fixtures_s3",
    "tests.fixtures_slides",
    "tests.fixtures_data",
    "tests.fixtures_teacher",
]


@pytest.fixture(scope="module", autouse=True)
def _disconnect_ray_after_module() -> Iterator[None]:
    """Leave no in-process Ray driver connected once a test module is done.

    Tests that call training code in-process connect this process to the session cluster; a
    driver left behind would outlive the cluster and make Ray abort pytest at exit.
    """
    yield
    ray_module = sys.modules.get("ray")
    if ray_module is not None and ray_module.is_initialized():
        ray_module.shutdown()
