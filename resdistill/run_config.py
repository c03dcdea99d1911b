"""A run's resolved configuration as readable YAML: written beside its outputs, read back by
``--config``.

The file is::

    resdistill: {version: 0.1.0, commit: 3f2a..., command: teacher}
    dataset: {url: ..., fingerprint: 9c1e...}        # when the run reads a dataset
    config: {data: {...}, model: {...}, ...}         # every option, nested as the config

``resdistill <command> --config runs/t1/config.yaml`` reads the ``config`` part (a plain mapping
of options is accepted too), so a run can be repeated with exactly its settings; flags given on
the command line override the file. The dataset fingerprint is the sha256 of ``dataset.json``'s
canonical JSON: two datasets with the same fingerprint have the same splits, counts, classes and
statistics.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: the file name beside a run's checkpoints and a command's outputs
CONFIG_FILE = "config.yaml"


def dump_yaml(doc: Mapping[str, Any]) -> str:
    """``doc`` as block-style YAML in declaration order."""
    import yaml

    return yaml.safe_dump(dict(doc), sort_keys=False, default_flow_style=False, width=100)


def read_config_file(path: str) -> dict[str, Any]:
    """The options of a YAML (or JSON) config file: its ``config`` mapping when it is a run's
    ``config.yaml``, else the whole mapping. ValueError when it is not a mapping."""
    import yaml

    from sharding.storage import open_storage
    from sharding.storage.base import is_remote

    if is_remote(path):
        parent, _, name = path.rstrip("/").rpartition("/")
        text = open_storage(parent).read_bytes(name).decode()
    else:
        text = Path(path).read_text()
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from None
    if isinstance(doc, Mapping) and isinstance(doc.get("config"), Mapping) and "resdistill" in doc:
        doc = doc["config"]
    if not isinstance(doc, Mapping):
        raise ValueError("expected a mapping of options (e.g. `data: {batch_size: 32}`)")
    return dict(doc)


def dataset_fingerprint(dataset_json: Mapping[str, Any]) -> str:
    """sha256 (16 hex digits) of ``dataset.json``'s canonical JSON."""
    text = json.dumps(dataset_json, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.cache
def git_commit() -> str | None:
    """The commit of the installed source tree when it is a git checkout, else None."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=5)  # fmt: skip
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def config_document(command: str, config: Mapping[str, Any],
                    dataset: tuple[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """The YAML document of a run: provenance, the dataset's URL and fingerprint, options."""
    from resdistill import __version__

    doc: dict[str, Any] = {
        "resdistill": {"version": __version__, "commit": git_commit(), "command": command}
    }
    if dataset is not None:
        url, dataset_json = dataset
        doc["dataset"] = {"url": url, "fingerprint": dataset_fingerprint(dataset_json)}
    doc["config"] = dict(config)
    return doc


def write_run_config(folder_url: str, command: str, config: Mapping[str, Any],
                     dataset: tuple[str, Mapping[str, Any]] | None = None) -> str:  # fmt: skip
    """Write ``<folder_url>/config.yaml`` (atomically; local folder or ``s3://``); its URL."""
    from sharding.storage import open_storage

    store = open_storage(folder_url)
    store.write_bytes(CONFIG_FILE, dump_yaml(config_document(command, config, dataset)).encode())
    return store.child_url(CONFIG_FILE)
