"""Scoring a selector and generator: predictions and their summary (:mod:`.predictions`), EM/F1/recall@k
(:mod:`.metrics`), and which model a failure is due to (:mod:`.attribution`).

``from dro_plugins.evaluation import evaluate`` (and the other names below) keeps working from before the layout of
folders.
"""

from dro_plugins.evaluation.predictions import batches, evaluate, predict, summarize

__all__ = ["batches", "evaluate", "predict", "summarize"]
