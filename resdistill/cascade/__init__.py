"""The student-teacher cascade: the student scores every tile, the unsure ones go to the teacher.

``rules`` (which tiles escalate, the combined probabilities, the cascade's counted FLOPs), which
``resdistill predict --teacher`` runs slide by slide; ``curve`` (accuracy against compute over a
grid of thresholds, from both models' scores of a dataset split) and ``plot`` (``cascade.png``),
which ``resdistill evaluate --cascade`` (:mod:`resdistill.eval.cascade_eval`) writes. Below both
``predict`` and ``eval``: it imports neither.
"""
