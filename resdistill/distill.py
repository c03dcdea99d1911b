"""``python -m resdistill.distill``: the ``resdistill distill`` command
(:mod:`resdistill.commands.distill`)."""

import sys

from resdistill.commands.distill import main

if __name__ == "__main__":
    sys.exit(main())
