"""An existing RAG pipeline as the thing DRO trains: the interface a framework adapter implements, and opening one.

An adapter turns a pipeline into a candidates source (its retriever), a prompt template (so the generator is trained
on the text it will read when serving) and a generator model; after training it turns the run back into pipeline
components. The core never imports an adapter at module level; :func:`open_pipeline` picks one from the run config.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from dro_plugins.config import RunConfig, local_model_path
from dro_plugins.data.examples import Example, Passage
from dro_plugins.errors import DataError, DROError
from dro_plugins.modeling.generator import PromptEncoder, PromptRenderer
from dro_plugins.data.labels import passage_has_answer
from dro_plugins.reporting.progress import Track, no_progress


class TrainablePipeline(Protocol):
    """What DRO needs from a framework's pipeline.

    Attributes:
        generator_model: HF id or local folder of the pipeline's generator model.
        query_encoder_model: the sentence-transformers model that embeds queries for the retriever (the query tower
            of ``selector.kind: retriever``), or None when the retriever searches by text.
        max_new_tokens: the longest answer the pipeline's generator gives when serving, where the export cannot set it
            (a LlamaIndex factory's LLM); None where the export sets ``generator.max_new_tokens`` (Haystack).
        exported: what :meth:`export` writes, in words, for the line ``dro optimize`` prints.
        export_notes: after :meth:`export`, what it changed from the user's pipeline so that serving matches training
            (one line each), for the log.
    """

    generator_model: str
    query_encoder_model: str | None
    max_new_tokens: int | None
    exported: str
    export_notes: list[str]

    def components(self) -> list[str]:
        """The pipeline's trainable units as found, one short line each (printed by ``dro validate``)."""

    def retrieve(self, question: str, num_candidates: int) -> list[Passage]:
        """The retriever's top ``num_candidates`` passages for a question, best first."""

    @property
    def query_affixes(self) -> tuple[str, str]:
        """The text the query embedder puts before and after a question; ``("", "")`` when it adds none."""

    def search(self, queries, n: int) -> list[list[tuple[Passage, object]]]:
        """The retriever's top ``n`` for each query embedding ``[B, d]``, with stored document embeddings or None
        (:class:`dro_plugins.selectors.index.DenseIndex`); only pipelines with a ``query_encoder_model``."""

    def prompt_renderer(self, tokenizer) -> PromptRenderer:
        """Renders the generator prompt exactly as the pipeline does when serving (template and chat template)."""

    def prompt_encoder(self, tokenizer) -> PromptEncoder:
        """Encodes a rendered prompt into the ids the pipeline's generator feeds its model when serving."""

    def export(self, run_dir: Path) -> Path:
        """Write what serving the optimized pipeline needs into ``run_dir``; return the main file or folder."""

    def served(self, run_dir: Path) -> dict[str, Callable[[str], tuple[str, list[Passage]]]]:
        """``{"original": ..., "optimized": ...}``: the user's pipeline and the exported one as the framework runs them,
        each ``question -> (answer, passages given to the generator)`` (``dro evaluate --served``)."""

    def framework_scores(self, answers: list[str], gold: list[list[str]], passages: list[list[Passage]]) -> dict[str, float]:
        """The framework's own evaluators on served answers and the passages given to the generator (a passage is
        relevant when it holds a gold answer), as ``{metric: mean over questions}``."""

    def fingerprint_parts(self) -> dict[str, object]:
        """What serving depends on beyond the run config, by part ("graph", "prompt template", "generator settings",
        ...): JSON-able values as the user's pipeline sets them, before DRO changes anything."""


def attach_candidates(
    examples: Sequence[Example],
    pipeline: TrainablePipeline,
    num_candidates: int,
    top_k: int,
    track: Track = no_progress,
) -> list[Example]:
    """Give each question the pipeline retriever's candidates, labelled ``has_answer`` by answer string match.

    The label (normalised answer occurs in the passage text, as in ``../shared/data``) drives the supervised
    warm-ups and the recall metric.

    Raises:
        DataError: the retriever returns fewer than ``top_k`` passages for a question.
    """
    attached = []
    for example in track(examples, "retrieve", len(examples), size=lambda _example: 1):
        passages = pipeline.retrieve(example.question, num_candidates)
        if len(passages) < top_k:
            raise DataError(
                f"question '{example.id}': the retriever returned {len(passages)} passages but selector.top_k is {top_k}; "
                "index more documents (documents:) or lower selector.top_k"
            )
        labelled = tuple(replace(p, has_answer=passage_has_answer(p, example.answers)) for p in passages)
        attached.append(replace(example, candidates=labelled))
    return attached


def open_pipeline(config: RunConfig, index_documents: bool = True, track: Track = no_progress) -> TrainablePipeline:
    """The framework adapter for ``config.pipeline``.

    ``index_documents=False`` (validation) checks ``documents`` without writing it into the pipeline's store;
    ``track`` shows progress while documents are embedded.

    Raises:
        DROError: the framework is not installed or the pipeline is unusable.
    """
    if config.pipeline.haystack is not None:
        try:
            from haystack_integrations.components.rankers.dro.pipeline import HaystackPipeline
        except ImportError as exc:
            raise DROError(f"pipeline.haystack needs Haystack ({exc.name} is missing): pip install 'dro-plugins[haystack]'") from exc
        return HaystackPipeline(config, index_documents, track)
    try:
        from llama_index.postprocessor.dro.engine import LlamaIndexPipeline
    except ImportError as exc:
        raise DROError(f"pipeline.llama_index needs LlamaIndex ({exc.name} is missing): pip install 'dro-plugins[llama-index]'") from exc
    return LlamaIndexPipeline(config)


def resolved_config(config: RunConfig, pipeline: TrainablePipeline | None) -> RunConfig:
    """The run config with what the pipeline names filled in (a copy; ``config`` is unchanged): its generator's
    model as ``generator.model``, its serving answer length (where the export cannot set it) as
    ``generator.max_new_tokens``, so validation answers as serving does; for a retriever selector (or the retriever
    unit, ``retriever.train``), its query embedder as ``selector.model`` (``retriever.model``) and its query prefix
    and suffix.

    Raises:
        DROError: the config names a different generator, answer length or query model than the pipeline.
    """
    if pipeline is None:
        return config
    resolved = config.model_copy(deep=True)
    model = local_model_path(pipeline.generator_model, Path.cwd())
    if config.generator.model not in (None, model):
        raise DROError(
            f"generator.model is '{config.generator.model}' but the pipeline's generator uses '{model}'; "
            "remove generator.model (the pipeline names it)"
        )
    resolved.generator.model = model
    if pipeline.max_new_tokens is not None:
        if "max_new_tokens" in config.generator.model_fields_set and config.generator.max_new_tokens != pipeline.max_new_tokens:
            raise DROError(
                f"generator.max_new_tokens is {config.generator.max_new_tokens} but the pipeline's generator answers with "
                f"max_new_tokens={pipeline.max_new_tokens} when serving; remove generator.max_new_tokens (the pipeline names it) "
                "or change the pipeline's"
            )
        resolved.generator.max_new_tokens = pipeline.max_new_tokens
    role = config.retriever_role
    if role is not None:  # the query tower is the pipeline's query embedding model
        encoder = local_model_path(pipeline.query_encoder_model, Path.cwd())
        section, target = getattr(config, role), getattr(resolved, role)
        if "model" in section.model_fields_set and section.model != encoder:
            raise DROError(
                f"{role}.model is '{section.model}' but the pipeline embeds queries with '{encoder}'; "
                f"remove {role}.model (the pipeline names it)"
            )
        target.model = encoder
        target.query_prefix, target.query_suffix = pipeline.query_affixes
    return resolved


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fp:
        for chunk in iter(lambda: fp.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def fingerprint(config: RunConfig, pipeline: TrainablePipeline | None) -> dict[str, str]:
    """A short digest of each part of the pipeline a run trains against, and of its ``documents`` file's content:
    what a resumed run must find unchanged (:func:`dro_plugins.training.run_folder.prepare` compares them), since the
    run config names the pipeline and corpus only by path.

    Returns:
        ``{part: 16 hex digits}``; empty without a pipeline.
    """
    if pipeline is None:
        return {}
    parts = {part: _digest(value) for part, value in pipeline.fingerprint_parts().items()}
    if config.documents is not None:
        parts["documents"] = _file_digest(config.documents)
    return parts


def dense_index(config: RunConfig, pipeline: TrainablePipeline | None):
    """The pipeline's store as the index a trained retriever (the selector kind, or the ``retriever.train`` unit)
    re-retrieves from; None when no query tower is trained."""
    return pipeline if pipeline is not None and config.retriever_role is not None else None


def use_pipeline_prompts(pipeline: TrainablePipeline, generator) -> None:
    """Train and score the generator on the pipeline's own prompt text and token ids."""
    generator.prompt = pipeline.prompt_renderer(generator.tokenizer)
    generator.encode = pipeline.prompt_encoder(generator.tokenizer)
