"""resdistill: resolution distillation for histology image classification."""

__version__ = "0.1.0"
