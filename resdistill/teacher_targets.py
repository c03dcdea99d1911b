"""``python -m resdistill.teacher_targets``: the ``resdistill teacher-targets`` command
(:mod:`resdistill.commands.teacher_targets`)."""

import sys

from resdistill.commands.teacher_targets import main

# the read side's names where the cached-target stream imported them from
from resdistill.train.targets_format import StaleTargetsError, TargetsIndex  # noqa: F401, E402

if __name__ == "__main__":
    sys.exit(main())
