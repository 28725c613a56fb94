"""Methods layer: one plug-in module per fine-tuning method, plus the training schedules.

A plug-in is a module in this package that defines ``METHOD``, an instance of
:class:`trainers.methods.base.Method`; :func:`get_method` finds it by ``adapter.name``. Adding a module
(and its ``conf/adapter/<name>.yaml``) is all it takes to add a method: nothing else lists them.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from trainers.core.errors import UserError
from trainers.methods.base import Method


@cache
def methods() -> dict[str, Method]:
    """adapter.name -> plug-in, for every module of this package that defines ``METHOD``."""
    found: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if isinstance(method, Method):
            if method.name in found:
                raise RuntimeError(f"two method plug-ins are called {method.name!r}")
            found[method.name] = method
    return found


def get_method(name: str) -> Method:
    """The plug-in of ``adapter.name``; UserError listing the known ones otherwise."""
    known = methods()
    if name not in known:
        raise UserError(f"unknown adapter.name {name!r} (choose from: {', '.join(sorted(known))})")
    return known[name]


__all__ = ["Method", "get_method", "methods"]
