"""Measuring models, below every package that scores one (numpy; torch only where a model runs).

``metrics`` (point metrics, ROC/AUC, slide aggregation: training's validation, evaluation and the
cascade curve share them) and ``bootstrap`` (their slide-clustered intervals, the metrics of one
prediction set); ``compute`` (parameters, counted FLOPs, images/s, FLOPs written for people).
"""
