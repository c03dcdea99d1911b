"""Hyperparameter tuning on Ray Tune: trials of the training stages, ASHA / PBT / FIFO.

* :mod:`~resdistill.tune.config` - :class:`~resdistill.tune.config.TuneConfig`, the run's options
* :mod:`~resdistill.tune.space` - domains, the search space, its checks against the dataset
* :mod:`~resdistill.tune.schedulers` - ASHA / PBT / FIFO, concurrency, the search's seed
* :mod:`~resdistill.tune.trial` - one trial: a Ray Train run per (re)start, reports forwarded
* :mod:`~resdistill.tune.trials_table` - the trials' table, the best trial, the best-json
* :mod:`~resdistill.tune.run` - the driver (:func:`~resdistill.tune.run.tune_run` of a config)
* :mod:`~resdistill.tune.stage` - every touch point with the training stages

The command line is :mod:`resdistill.commands.tune` (``resdistill tune``,
``python -m resdistill.tune``).
"""
