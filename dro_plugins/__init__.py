"""dro-plugins: fine-tune a RAG pipeline's selector and generator end to end with DRO (arXiv 2505.03075).

The library entry points are :func:`dro_plugins.optimize`, :func:`dro_plugins.evaluate` and
:func:`dro_plugins.load_trained` (:mod:`dro_plugins.api`); ``docs/architecture.md`` maps the packages.
"""

from dro_plugins import compat

compat.install()

__all__ = ["evaluate", "load_trained", "optimize"]


def __getattr__(name: str):
    """The entry points, imported on first use (``import dro_plugins`` stays light: no torch until needed)."""
    if name in __all__:
        from dro_plugins import api

        return getattr(api, name)
    raise AttributeError(f"module 'dro_plugins' has no attribute {name!r}")
