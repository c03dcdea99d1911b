"""Slide prediction at scale: the Ray Data pipeline, its outputs, heatmaps and the cascade."""
