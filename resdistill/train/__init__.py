"""Training on Ray Train: one worker for every stage, stages behind a small protocol.

Driver side: :mod:`~resdistill.train.preflight` (check a :class:`~resdistill.config.TrainConfig`
against dataset, teacher and targets; fill its ``plan``), :mod:`~resdistill.train.driver`
(``train(cfg) -> RunSummary``), :mod:`~resdistill.train.runner` (the ``TorchTrainer``, summary).
Worker side: :mod:`~resdistill.train.worker` (THE Ray Train function),
:mod:`~resdistill.train.stages` (supervised, distillation), :mod:`~resdistill.train.loop` (epochs,
state, checkpoints), :mod:`~resdistill.train.validate`, :mod:`~resdistill.train.optim`,
:mod:`~resdistill.train.worker_env`, :mod:`~resdistill.train.teacher_net` (frozen teacher, one
distillation step). Cached teacher targets: :mod:`~resdistill.train.targets` (writer) and
:mod:`~resdistill.data.targets` (layout, identity, reader).
"""
