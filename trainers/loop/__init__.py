"""Loop layer: the one training loop (state, hooks, named optimizers, checkpoints) that knows no method."""
