"""Synthetic training data: `skyloom.datasets.shapes` generates "shapes world" clips with ground truth."""
