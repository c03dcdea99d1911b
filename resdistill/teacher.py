"""``python -m resdistill.teacher``: the ``resdistill teacher`` command
(:mod:`resdistill.commands.teacher`)."""

import sys

from resdistill.commands.teacher import main

if __name__ == "__main__":
    sys.exit(main())
