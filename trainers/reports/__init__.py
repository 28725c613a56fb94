"""Reports layer: the sweep summary and the continual-learning metrics and plots."""
