"""mkdocs hooks of the documentation site (mkdocs.yml ``hooks:``; excluded from the site itself).

The changelog page shows the repository's ``CHANGELOG.md``, whose links are written from the
repository root (``docs/results.md``) so that they work where the file is read on its own; on
the site they are made relative to ``docs/`` again.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

CHANGELOG = Path(__file__).resolve().parents[1] / "CHANGELOG.md"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """``docs/changelog.md`` becomes ``CHANGELOG.md`` with its ``docs/`` links rebased."""
    if page.file.src_uri != "changelog.md":
        return markdown
    return re.sub(r"\]\(docs/", "](", CHANGELOG.read_text(encoding="utf-8"))
