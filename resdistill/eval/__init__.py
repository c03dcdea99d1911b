"""Scoring models: metrics with confidence intervals, compute cost, evaluation, prediction."""
