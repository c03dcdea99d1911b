"""Measuring models, below every package that scores one (numpy; torch only where a model runs).

``metrics`` (point metrics, ROC/AUC, slide aggregation: training's validation, evaluation and the
cascade curve share them), ``bootstrap`` (their unit-clustered, class-stratified intervals, the
metrics of one prediction set) and ``paired`` (an arm's metric over its seeds and the paired
difference of two arms, units and seeds resampled together); ``compute`` (parameters, counted
FLOPs, images/s, FLOPs written for people).
"""
