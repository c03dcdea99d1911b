"""Scoring models against a dataset split: evaluation, its records, files, table and figures.

``evaluate`` (models against a dataset split) -> ``results`` (the records) -> ``report_files``
(files, table) and ``plots``; ``cascade_eval`` (``evaluate --cascade``: each student's cascade
curve, :mod:`resdistill.cascade`, beside its evaluation). The metrics, their bootstrap intervals
and the compute cost are :mod:`resdistill.measures`, which training's validation and prediction
share.
"""
