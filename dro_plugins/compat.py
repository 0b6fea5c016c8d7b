"""Import paths from before the layout of folders, kept working: ``dro_plugins.trainer`` is
``dro_plugins.training.trainer``, and so on (:data:`MOVED`).

An old path imports the module at its new place and registers the same module object under the old name, so a
monkeypatch or an ``isinstance`` through either name sees one module. ``dro_plugins.data``, ``.evaluation`` and
``.reporting`` became packages of the same name; their ``__init__`` re-exports the old names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "dro_plugins.attribution": "dro_plugins.evaluation.attribution",
    "dro_plugins.batching": "dro_plugins.modeling.batching",
    "dro_plugins.checkpoint": "dro_plugins.training.checkpoint",
    "dro_plugins.generator": "dro_plugins.modeling.generator",
    "dro_plugins.lm": "dro_plugins.modeling.causal_lm",
    "dro_plugins.metrics": "dro_plugins.evaluation.metrics",
    "dro_plugins.models": "dro_plugins.modeling.loading",
    "dro_plugins.objective": "dro_plugins.training.objective",
    "dro_plugins.packing": "dro_plugins.modeling.packing",
    "dro_plugins.permutation": "dro_plugins.modeling.permutation",
    "dro_plugins.plots": "dro_plugins.reporting.plots",
    "dro_plugins.progress": "dro_plugins.reporting.progress",
    "dro_plugins.prompts": "dro_plugins.modeling.prompts",
    "dro_plugins.run": "dro_plugins.build",
    "dro_plugins.runtime": "dro_plugins.distributed",
    "dro_plugins.supervision": "dro_plugins.data.supervision",
    "dro_plugins.synthetic": "dro_plugins.data.synthetic",
    "dro_plugins.throughput": "dro_plugins.reporting.throughput",
    "dro_plugins.tokenization": "dro_plugins.modeling.tokenization",
    "dro_plugins.trainer": "dro_plugins.training.trainer",
    "dro_plugins.units": "dro_plugins.modeling.units",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        sys.modules[spec.name] = module
        return module

    def exec_module(self, module) -> None:
        pass


class MovedModules(importlib.abc.MetaPathFinder):
    """Finds an old module path of :data:`MOVED` and loads the module at its new path under it."""

    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, _Alias(MOVED[name]))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())
