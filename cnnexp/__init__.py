"""cnnexp: the tutorial CNN trained, tracked in MLflow and tuned with Optuna.

The Python API (cnnexp/api.py; README, "From Python"): cnnexp.prepare, train, evaluate, tune, compare and
export take their command's parameters, with its defaults; cnnexp.best_params(study) gives a study's best
as {"lr", "batch_size"}. `import cnnexp` imports none of torch, MLflow or Optuna: each name is looked up
in cnnexp.api when first used (PEP 562), and that module imports them only when a function runs.
"""
from __future__ import annotations

import importlib
import sys
import types

__all__ = ["prepare", "train", "evaluate", "tune", "compare", "export", "best_params"]


def __getattr__(name: str):
    if name in __all__:
        # Looked up by name on first use, when cnnexp is whole: cnnexp.api sits above everything (it runs the
        # pipelines), so it is no import of the package's own, and no import circle (tests/unit/test_boundaries.py).
        return getattr(importlib.import_module("cnnexp.api"), name)
    raise AttributeError(f"module 'cnnexp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


class _Package(types.ModuleType):
    """cnnexp.train and cnnexp.evaluate are also modules (the training loop, scoring). Importing a submodule
    binds it on its package, which would turn cnnexp.train from the API function into that module once
    anything imported it; this keeps the API's names for the API. The modules stay importable as always
    (`from cnnexp.train import fit`); `from cnnexp import train` gives the function."""

    def __setattr__(self, name: str, value) -> None:
        if name in __all__ and isinstance(value, types.ModuleType):
            return  # the submodule is in sys.modules, where `from cnnexp.<name> import ...` finds it
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
