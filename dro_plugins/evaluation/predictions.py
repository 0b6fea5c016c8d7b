"""Scoring a selector and generator on questions: EM, F1 and selection recall (recall@k)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dro_plugins.evaluation.attribution import failure_class, fractions
from dro_plugins.modeling.batching import run_in_microbatches
from dro_plugins.data.examples import Example
from dro_plugins.modeling.generator import LMGenerator
from dro_plugins.evaluation.metrics import exact_match, f1_score, selection_recall
from dro_plugins.reporting.progress import Track, no_progress
from dro_plugins.selectors.base import Selector


def batches(items: Sequence, size: int) -> list[Sequence]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def evaluate(
    selector: Selector,
    generator: LMGenerator,
    examples: Sequence[Example],
    batch_size: int,
    track: Track = no_progress,
    max_tokens: int | None = None,
) -> dict:
    """Select greedily, answer greedily, and score: :func:`summarize` of :func:`predict`.

    Returns:
        ``{"em", "f1", "recall", "answer_log_likelihood", "attribution", "predictions"}``: EM, F1 and recall are means
        over questions in [0, 1]; ``answer_log_likelihood`` is the mean log p_G(y | x, d_z) of the gold answer given the
        greedy selection (nats per question), which moves even when no generated answer is right yet;
        ``attribution`` the share of questions per :mod:`dro_plugins.evaluation.attribution` class; ``predictions`` as
        :func:`predict` returns them.
    """
    return summarize(predict(selector, generator, examples, batch_size, track, max_tokens))


def predict(
    selector: Selector,
    generator: LMGenerator,
    examples: Sequence[Example],
    batch_size: int,
    track: Track = no_progress,
    max_tokens: int | None = None,
    lockstep: Callable | None = None,
) -> list[dict]:
    """Per question: the greedy selection, the greedy answer and their scores.

    Args:
        batch_size: questions per progress step.
        track: wraps the batch loop for progress display (:class:`dro_plugins.reporting.progress.Track`).
        max_tokens: padded tokens per forward pass (``dro.max_tokens_per_microbatch``); None = no limit.
        lockstep: ``Runtime.lockstep_plan`` when processes shard the weights, as
            :func:`dro_plugins.modeling.batching.run_in_microbatches`.

    Returns:
        One ``{"id", "prediction", "selected", "failure", "em", "f1", "recall", "pool_recall",
        "answer_log_likelihood"}`` per question, in order: 0-based selected candidate indices, the question's failure
        class, and its scores (``pool_recall``: 1 when any candidate of the pool holds an answer, recall@n). With a
        selector that re-retrieves its pools (:meth:`Selector.candidates`), indices and recall refer to that pool.
    """
    predictions = []
    for given in track(batches(examples, batch_size), "evaluate", len(examples), size=len):
        batch = selector.candidates(given)  # a trainable retriever with an index retrieves with its current weights
        selected = run_in_microbatches(
            [selector.shape(ex, 1) for ex in batch], max_tokens, lambda micro: selector.select([batch[i] for i in micro]), lockstep
        )
        shapes = [generator.shape(ex, [picks]) for ex, picks in zip(batch, selected)]
        answers = run_in_microbatches(
            shapes, max_tokens, lambda micro: generator.generate([batch[i] for i in micro], [selected[i] for i in micro]), lockstep
        )
        with torch.no_grad():
            likelihoods = run_in_microbatches(
                shapes,
                max_tokens,
                lambda micro: generator.log_likelihood([batch[i] for i in micro], torch.tensor([[selected[i]] for i in micro]))[:, 0].tolist(),
                lockstep,
            )
        for example, picks, answer, likelihood in zip(batch, selected, answers, likelihoods):
            predictions.append({
                "id": example.id, "prediction": answer, "selected": picks, "failure": failure_class(example, picks, answer),
                "em": exact_match(answer, example.answers), "f1": f1_score(answer, example.answers),
                "recall": selection_recall([example.candidates[i] for i in picks], example.answers),
                "pool_recall": selection_recall(example.candidates, example.answers),
                "answer_log_likelihood": likelihood,
            })
    return predictions


def summarize(predictions: Sequence[dict]) -> dict:
    """Means over questions of :func:`predict`'s scores, the failure-class shares, and the predictions themselves.

    Raises:
        ValueError: no predictions.
    """
    if not predictions:
        raise ValueError("no predictions to summarize")
    n = len(predictions)
    means = {key: sum(p[key] for p in predictions) / n for key in ("em", "f1", "recall", "pool_recall", "answer_log_likelihood")}
    return {**means, "attribution": fractions([p["failure"] for p in predictions]), "predictions": list(predictions)}
