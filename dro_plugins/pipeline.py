"""An existing RAG pipeline as the thing DRO trains: the interface a framework adapter implements.

DESIGN.md §4: an adapter turns a pipeline into a candidates source (its retriever), a prompt template (so the
generator is trained on the text it will read when serving) and a generator model; after training it turns the
run back into pipeline components. The core never imports an adapter; the CLI picks one from the run config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from dro_plugins.data import Example, Passage
from dro_plugins.errors import DataError
from dro_plugins.generator import PromptEncoder, PromptRenderer
from dro_plugins.metrics import passage_has_answer
from dro_plugins.progress import Track, no_progress


class TrainablePipeline(Protocol):
    """What DRO needs from a framework's pipeline.

    Attributes:
        generator_model: HF id or local folder of the pipeline's generator model.
        query_encoder_model: the sentence-transformers model that embeds queries for the retriever (the query tower
            of ``selector.kind: retriever``), or None when the retriever searches by text.
        exported: what :meth:`export` writes, in words, for the line ``dro optimize`` prints.
    """

    generator_model: str
    query_encoder_model: str | None
    exported: str

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
