"""`resdistill study`: the paper's claims as a grid of runs (see resdistill.study.run)."""
