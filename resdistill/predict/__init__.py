"""Slide prediction at scale: the Ray Data pipeline, its outputs and heatmaps.

``driver`` (the command: options, read chains, progress, summary) -> ``engine`` (waves of slides
through one Ray Data pipeline) -> ``slide_plan`` (per-slide planning tasks) and ``stages`` (read
tasks, inference actors) -> ``outputs`` (per-slide files, resume, ``slides.parquet`` /
``tiles.parquet``), ``heatmaps`` (pictures: ``tile_paint`` paints tiles, ``outlines`` draws
annotation outlines read by ``annotation_overlay``), ``summary`` (progress and final table).
Slides are read through :mod:`resdistill.read_chain`; the student-teacher rules are
:mod:`resdistill.cascade.rules`.
"""
