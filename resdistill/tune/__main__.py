"""``python -m resdistill.tune``: the ``resdistill tune`` command (:mod:`resdistill.commands.tune`)."""

import sys

from resdistill.commands.tune import main

if __name__ == "__main__":
    sys.exit(main())
