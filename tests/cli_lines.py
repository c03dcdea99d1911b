"""The CLI's own error lines in captured stderr, apart from what Ray relays there.

Every command reports a refusal as one line ``<prog>: error: <why>`` (``predict: error: ...``,
``resdistill teacher: error: ...`` for option errors). A Ray cluster's processes may print to the
same stream (``(pid=gcs_server) ... error: ...``), so a test counts lines that *start* with a
command's prefix, never lines that merely contain "error:".
"""

from __future__ import annotations

import re

_OURS = re.compile(r"^(resdistill )?[a-z][a-z-]*: error: ")


def error_lines(err: str) -> list[str]:
    """The lines of ``err`` that are a resdistill command's error report."""
    return [line for line in err.splitlines() if _OURS.match(line)]
