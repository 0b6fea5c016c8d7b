"""Haystack integration of dro-plugins, installed as ``haystack_integrations.components.rankers.dro``."""

from haystack_integrations.components.rankers.dro.pipeline import load_pipeline
from haystack_integrations.components.rankers.dro.selector import DROSelector

__all__ = ["DROSelector", "load_pipeline"]
