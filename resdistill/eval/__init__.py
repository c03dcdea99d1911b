"""Scoring models: metrics with confidence intervals, compute cost, evaluation, prediction.

``metrics`` (point metrics, ROC/AUC, slide aggregation) and ``bootstrap`` (their intervals and
the report of one prediction set); ``compute`` (parameters, FLOPs, images/s); ``evaluate``
(models against a dataset split) -> ``results`` (the records) -> ``report`` (files, table) and
``plots``; ``tiling`` (a slide's region grid) -> ``predict`` (slides -> probabilities, heatmaps).
"""
