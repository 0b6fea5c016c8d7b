"""``DROSelectorPostprocessor``: a LlamaIndex node postprocessor that selects and orders the top-n nodes with DRO."""

from __future__ import annotations

import logging
from pathlib import Path

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryBundle

from dro_plugins.config import load_config
from dro_plugins.data.examples import Passage
from dro_plugins.training.run_folder import RunPaths
from dro_plugins.serving import candidate_count_problem, load_selector, select_or_fallback, trained_candidates

logger = logging.getLogger(__name__)
dispatcher = get_dispatcher(__name__)


def node_to_passage(node: BaseNode) -> Passage:
    """A LlamaIndex node as a core :class:`Passage`: its text without metadata, title from ``metadata["title"]``."""
    return Passage(id=node.node_id, title=str(node.metadata.get("title", "")), text=node.get_content(MetadataMode.NONE))


class DROSelectorPostprocessor(BaseNodePostprocessor):
    """Selects and orders the top-n retrieved nodes with a generative list-wise selector trained by DRO.

    The selector reads the query and the numbered nodes and writes a ranked selection such as ``[7] > [2] > [15]``
    (Shi et al., 2025, arXiv 2505.03075, §4); the selected nodes keep their retrieval scores. Emits LlamaIndex's
    ``ReRankStartEvent``/``ReRankEndEvent`` like the built-in rerankers. When the selector's output is unusable or
    the model fails it logs a warning and returns the first ``top_n`` nodes in their input order; it never raises
    for that. ``apostprocess_nodes`` (async) runs the same selection in a worker thread.

    Usage:
        ```python
        from llama_index.postprocessor.dro import DROSelectorPostprocessor

        engine = index.as_query_engine(
            similarity_top_k=10, node_postprocessors=[DROSelectorPostprocessor.from_pretrained("runs/llama_index_nq")]
        )
        ```
    """

    model: str = Field(description="A run folder written by `dro optimize` (its best selector) or an HF id/local folder.")
    top_n: int = Field(default=5, ge=1, description="Nodes returned.")
    device: str | None = Field(default=None, description="'auto', 'cpu', 'cuda' or 'cuda:N'; None keeps the run's setting.")
    max_passage_words: int | None = Field(
        default=None, description="Each node is cut to this many words in the selector prompt; None takes the run's setting."
    )
    constrained: bool = Field(default=True, description="Constrained decoding (always valid); False parses free text.")
    max_new_tokens: int = Field(default=64, ge=1, description="Longest free-text output (constrained=False), in tokens.")

    _selector = PrivateAttr(default=None)
    _trained = PrivateAttr(default=None)  # data.num_candidates of the run; more nodes at serving get one warning
    _warned = PrivateAttr(default=False)

    @classmethod
    def class_name(cls) -> str:
        return "DROSelectorPostprocessor"

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, **kwargs) -> DROSelectorPostprocessor:
        """The postprocessor for a ``dro optimize`` run folder; ``top_n`` defaults to the run's ``selector.top_k``.

        Raises:
            dro_plugins.errors.ConfigError: ``run_dir`` has no readable ``config.yaml``.
        """
        config = load_config(RunPaths(Path(run_dir)).config)
        return cls(model=str(run_dir), **{"top_n": config.selector.top_k, **kwargs})

    def load(self) -> None:
        """Load the selector's weights (once; the first query does it otherwise).

        Raises:
            dro_plugins.errors.DROError: the model cannot be found or loaded.
        """
        if self._selector is None:
            self._selector = load_selector(self.model, self.top_n, self.device, self.max_passage_words)
            self._trained = trained_candidates(self.model)

    def _postprocess_nodes(self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        """Select and order nodes for the query: at most ``top_n``, best first, scores unchanged."""
        dispatcher.event(ReRankStartEvent(query=query_bundle, nodes=nodes, top_n=self.top_n, model_name=self.model))
        self.load()
        mismatch = candidate_count_problem(self._trained, len(nodes), "the retriever's similarity_top_k")
        if mismatch is not None and not self._warned:
            logger.warning("DROSelectorPostprocessor: %s", mismatch)
            self._warned = True
        query = query_bundle.query_str if query_bundle is not None else ""
        passages = [node_to_passage(n.node) for n in nodes]
        picked, problem = select_or_fallback(self._selector, query, passages, self.top_n, self.constrained, self.max_new_tokens)
        if problem is not None:
            logger.warning("DROSelectorPostprocessor: %s; returning the first %d nodes in input order", problem, len(picked))
        selected = [nodes[i] for i in picked]
        dispatcher.event(ReRankEndEvent(nodes=selected))
        return selected
