"""CLI layer: config schemas and checks, ``run_cli`` (what ``main.py`` runs), the Hydra job and callbacks."""
