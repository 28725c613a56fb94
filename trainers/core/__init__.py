"""Bottom layer: errors and file helpers that every other layer may use (imports nothing of the project)."""
