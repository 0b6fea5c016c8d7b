"""Selecting passages at serving time, shared by the Haystack component and the LlamaIndex postprocessor.

Serving must never fail because of the selector: whatever goes wrong (an unusable output, a model error), the
caller gets the first-stage order back together with the reason, and logs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dro_plugins.build import load_trained_selector
from dro_plugins.config import load_config
from dro_plugins.data.examples import Example, Passage
from dro_plugins.distributed.device import resolve_device
from dro_plugins.errors import DROError
from dro_plugins.modeling.loading import load_pretrained
from dro_plugins.modeling.permutation import parse_permutation
from dro_plugins.selectors.lm import LMSelector
from dro_plugins.selectors.retriever import RetrieverSelector
from dro_plugins.training.run_folder import RunPaths

DEFAULT_PASSAGE_WORDS = 100


def load_selector(
    model: str, top_k: int, device: str | None = None, max_passage_words: int | None = None
) -> LMSelector | RetrieverSelector:
    """A selector for inference from a ``dro optimize`` run folder or from a Hugging Face id/path.

    A run folder of ``selector.kind: retriever`` gives its trained retriever, which orders the documents it is given
    by its query tower's scores (``constrained`` makes no difference to it).

    Args:
        model: a run folder (has ``config.yaml``: its best selector adapter is loaded) or an HF id/local folder
            (a plain causal LM, used as it is).
        top_k: default k of :meth:`LMSelector.select`.
        device: "auto", "cpu", "cuda", "cuda:N"; None keeps the run's device (run folder) or "auto".
        max_passage_words: passages are cut to this many words (LM selectors); None takes the run's setting (or 100).

    Raises:
        DROError: the folder is not a run folder it claims to be, the model cannot be loaded, or
            ``max_passage_words`` is given for a retriever run (its document tower reads passages as it was trained).
    """
    if RunPaths(Path(model)).config.is_file():
        selector = load_trained_selector(model, device)
        if isinstance(selector, RetrieverSelector) and max_passage_words is not None:
            raise DROError(
                f"{model} is a retriever run: it embeds whole passages as its document tower was trained, so "
                "max_passage_words does not apply; leave it unset"
            )
        selector.top_k = top_k
        if max_passage_words is not None:
            selector.max_passage_words = max_passage_words
        return selector
    torch_device, dtype = resolve_device(device or "auto")
    lm, tokenizer = load_pretrained(model, trust_remote_code=False, field="model", device=torch_device, dtype=dtype)
    return LMSelector(lm, tokenizer, top_k=top_k, max_passage_words=max_passage_words or DEFAULT_PASSAGE_WORDS)


def trained_candidates(model: str) -> int | None:
    """How many candidates a run folder's selector was trained to choose from (``data.num_candidates``); None for
    a plain model."""
    paths = RunPaths(Path(model))
    return load_config(paths.config).data.num_candidates if paths.config.is_file() else None


def candidate_count_problem(trained: int | None, received: int, setting: str) -> str | None:
    """A warning when serving gives the selector more candidates than it was trained on (``setting`` names the
    first-stage option to change); None otherwise. Fewer is normal (a score cut-off before the selector)."""
    if trained is None or received <= trained:
        return None
    return f"got {received} candidates but was trained to choose from {trained}; set {setting} to {trained} so serving matches training"


def select_or_fallback(
    selector: LMSelector | RetrieverSelector,
    query: str,
    passages: Sequence[Passage],
    top_k: int,
    constrained: bool = True,
    max_new_tokens: int = 64,
) -> tuple[list[int], str | None]:
    """The selector's top-k for one query, or the first-stage order when its output is unusable. Never raises.

    Args:
        selector: the selector.
        query: the question.
        passages: the candidates, in first-stage order.
        top_k: how many to select; capped at ``len(passages)``.
        constrained: decode with the permutation grammar (always valid); False writes free text and parses it
            with :func:`dro_plugins.modeling.permutation.parse_permutation`. A selector that writes no text (the
            retriever) ranks by its scores either way.
        max_new_tokens: longest free-text output, in tokens.

    Returns:
        ``(indices, problem)``: 0-based indices into ``passages``, best first, and None; or the first ``top_k``
        indices and a sentence saying why the selector's output was not used.
    """
    k = min(top_k, len(passages))
    fallback = list(range(k))
    if k == 0:
        return fallback, None
    if not query.strip():
        return fallback, "the query is empty"
    example = Example(id="query", question=query, answers=("",), candidates=tuple(passages))
    try:
        if constrained or not isinstance(selector, LMSelector):
            picked = list(selector.select([example], k)[0])
            text = str(picked)
        else:
            text = selector.write([example], k, max_new_tokens)[0]
            picked = parse_permutation(text, len(passages), k)
    except Exception as exc:  # noqa: BLE001 - serving falls back on any model failure, and says why
        return fallback, f"the selector failed ({type(exc).__name__}: {exc})"
    valid = picked is not None and len(picked) == k and len(set(picked)) == k and all(0 <= i < len(passages) for i in picked)
    if not valid:
        return fallback, f"the selector wrote {text[:80]!r}, which does not name {k} distinct candidates [1]..[{len(passages)}]"
    return picked, None
