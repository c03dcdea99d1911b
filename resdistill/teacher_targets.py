"""``python -m resdistill.teacher_targets``: the ``resdistill teacher-targets`` command
(:mod:`resdistill.commands.teacher_targets`)."""

import sys

from resdistill.commands.teacher_targets import main

if __name__ == "__main__":
    sys.exit(main())
