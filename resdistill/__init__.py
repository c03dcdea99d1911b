"""resdistill: resolution distillation for histology image classification.

``import resdistill as rd`` gives the Python API of :mod:`resdistill.api`: ``rd.shard``,
``rd.train_teacher``, ``rd.distill``, ``rd.evaluate``, ``rd.predict_slides``, ``rd.read_tiles``
and ``rd.load_model``, with their result types (``rd.predict`` is the :mod:`resdistill.predict`
package, hence the longer name). The API module is imported on first use, so
``import resdistill`` (and so ``resdistill --help``) loads no heavy library.
"""

__version__ = "0.1.0"

#: the names :mod:`resdistill.api` lends the package
_API = frozenset({
    "Model", "ShardResult", "TrainResult", "distill", "evaluate", "load_model", "predict_slides",
    "read_tiles", "shard", "train_teacher",
})  # fmt: skip


def __getattr__(name: str):  # noqa: ANN202 - whatever the API names
    """``rd.<name>`` from :mod:`resdistill.api`, imported on first use (PEP 562)."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module("resdistill.api"), name)
    raise AttributeError(f"module 'resdistill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
