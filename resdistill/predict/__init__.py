"""Slide prediction at scale: the Ray Data pipeline, its outputs, heatmaps and the cascade.

``driver`` (the command: options, read chains, progress, summary) -> ``engine`` (waves of slides
through one Ray Data pipeline) -> ``plan`` (per-slide planning tasks) and ``stages`` (read tasks,
inference actors) -> ``outputs`` (per-slide files, resume, ``slides.parquet`` /
``tiles.parquet``), ``heatmaps`` (pictures), ``cascade`` (student-teacher rules), ``summary``
(progress and final table).
"""
