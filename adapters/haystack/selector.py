"""``DROSelector``: a Haystack ranker component that selects and orders the top-k documents with a DRO selector."""

from __future__ import annotations

from typing import Any

from haystack import Document, component, default_from_dict, default_to_dict, logging

from dro_plugins.data.examples import Passage
from dro_plugins.serving import candidate_count_problem, load_selector, select_or_fallback, trained_candidates

logger = logging.getLogger(__name__)


def document_to_passage(document: Document) -> Passage:
    """A Haystack ``Document`` as a core :class:`Passage` (title from ``meta["title"]`` when present)."""
    return Passage(id=str(document.id), title=str(document.meta.get("title", "")), text=document.content or "")


@component
class DROSelector:
    """Selects and orders the top-k of the retrieved documents with a generative list-wise selector trained by DRO.

    Same sockets as Haystack's rankers. The selector reads the query and the numbered documents and writes a
    ranked selection such as ``[7] > [2] > [15]`` (Shi et al., 2025, arXiv 2505.03075, §4). By default decoding is
    constrained to valid selections; with ``constrained=False`` the model writes free text that is parsed. When
    the output is unusable or the model fails, the component logs a warning and returns the first ``top_k``
    documents in their input order; it never raises for that.

    Usage:
        ```python
        from haystack_integrations.components.rankers.dro import DROSelector

        selector = DROSelector(model="runs/haystack_nq", top_k=5)
        selector.warm_up()
        selector.run(query="who wrote hamlet?", documents=documents)["documents"]
        ```
    """

    def __init__(
        self,
        *,
        model: str,
        top_k: int = 5,
        device: str | None = None,
        max_passage_words: int | None = None,
        constrained: bool = True,
        max_new_tokens: int = 64,
    ) -> None:
        """Store settings only; weights load in :meth:`warm_up`.

        Args:
            model: a run folder written by ``dro optimize`` (its best selector) or a Hugging Face id/local folder.
            top_k: documents returned; ``run(top_k=...)`` overrides it.
            device: "auto", "cpu", "cuda" or "cuda:N"; None keeps the run's device setting (run folder) or "auto".
            max_passage_words: each document is cut to this many words in the selector prompt; None takes the
                run's setting (100 for an HF model). Refused for a retriever run, which embeds whole documents.
            constrained: constrained decoding (always a valid selection); False parses free text. A retriever
                run orders the documents by its trained query tower's scores either way.
            max_new_tokens: longest free-text output (``constrained=False``), in tokens.

        Raises:
            ValueError: ``top_k`` or ``max_new_tokens`` is not positive.
        """
        if top_k < 1 or max_new_tokens < 1:
            raise ValueError(f"top_k and max_new_tokens must be >= 1, got {top_k} and {max_new_tokens}")
        self.model = model
        self.top_k = top_k
        self.device = device
        self.max_passage_words = max_passage_words
        self.constrained = constrained
        self.max_new_tokens = max_new_tokens
        self._selector = None
        self._trained = None  # data.num_candidates of the run; more candidates at serving get one warning
        self._warned = False

    def warm_up(self) -> None:
        """Load the selector's weights (once).

        Raises:
            dro_plugins.errors.DROError: the model cannot be found or loaded.
        """
        if self._selector is None:
            self._selector = load_selector(self.model, self.top_k, self.device, self.max_passage_words)
            self._trained = trained_candidates(self.model)

    def to_dict(self) -> dict[str, Any]:
        """Serialise the settings (not the weights)."""
        return default_to_dict(
            self,
            model=self.model,
            top_k=self.top_k,
            device=self.device,
            max_passage_words=self.max_passage_words,
            constrained=self.constrained,
            max_new_tokens=self.max_new_tokens,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DROSelector:
        """Build the component from :meth:`to_dict` output."""
        return default_from_dict(cls, data)

    @component.output_types(documents=list[Document])
    def run(self, query: str, documents: list[Document], top_k: int | None = None) -> dict[str, list[Document]]:
        """Select and order documents for a query.

        Args:
            query: the question.
            documents: candidates in first-stage order (numbered [1], [2], ... for the selector).
            top_k: how many to return; overrides the init value.

        Returns:
            ``{"documents": [...]}``: at most ``top_k`` documents, best first.

        Raises:
            ValueError: ``top_k`` is not positive.
        """
        top_k = self.top_k if top_k is None else top_k
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.warm_up()
        mismatch = candidate_count_problem(self._trained, len(documents), "the top_k of the components before the selector")
        if mismatch is not None and not self._warned:
            logger.warning("DROSelector: {problem}", problem=mismatch)
            self._warned = True
        passages = [document_to_passage(d) for d in documents]
        picked, problem = select_or_fallback(
            self._selector, query, passages, top_k, self.constrained, self.max_new_tokens
        )
        if problem is not None:
            logger.warning(
                "DROSelector: {problem}; returning the first {k} documents in input order", problem=problem, k=len(picked)
            )
        return {"documents": [documents[i] for i in picked]}
