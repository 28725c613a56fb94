"""Experiments layer: a :class:`~trainers.experiments.session.Session` sets a run up; the single run and the
continual task loop both train through it."""
