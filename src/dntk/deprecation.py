"""Old names kept for one release after a move or rename: a package's module-level ``__getattr__``
that answers an old name with the new object and a :class:`DeprecationWarning` naming where it went.

    __getattr__ = moved(__name__, {"old_name": "dntk.new.module:new_name"}, remove_in="0.2")

The new module is imported only when an old name is asked for, so an alias from a library package to
the application layer (``dntk.pipeline``) adds no import edge to the package's own import — the layer
contract (tests/test_layers.py) lists each such alias by name."""

from __future__ import annotations

import importlib
import warnings


def moved(package: str, names: dict[str, str], *, remove_in: str):
    """A module ``__getattr__`` for ``package`` resolving each old name of ``names`` to its new home
    ``"module:attribute"`` (with a DeprecationWarning); any other name raises AttributeError."""

    def __getattr__(name):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = names[name].split(":")
        warnings.warn(f"{package}.{name} is now {module}.{attr}; the old name goes in {remove_in}",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), attr)

    return __getattr__
