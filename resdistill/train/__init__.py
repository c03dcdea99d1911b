"""Training on Ray Train: typed configs, one runner, stages behind a small protocol."""
