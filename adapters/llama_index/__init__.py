"""LlamaIndex integration of dro-plugins, installed as ``llama_index.postprocessor.dro``."""

from llama_index.postprocessor.dro.postprocessor import DROSelectorPostprocessor

__all__ = ["DROSelectorPostprocessor"]
