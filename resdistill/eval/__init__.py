"""Scoring models: metrics with confidence intervals, compute cost, evaluation, slide tiling.

``metrics`` (point metrics, ROC/AUC, slide aggregation) and ``bootstrap`` (their intervals and
the report of one prediction set); ``compute`` (parameters, FLOPs, images/s); ``evaluate``
(models against a dataset split) -> ``results`` (the records) -> ``report`` (files, table) and
``plots``; ``tiling`` (a checkpoint's read chain replayed on a slide), which whole-slide
prediction (:mod:`resdistill.predict`) reads slides with.
"""
