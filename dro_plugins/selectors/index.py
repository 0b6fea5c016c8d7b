"""Where a trainable retriever re-retrieves its candidate pools: an index of document-tower embeddings.

:class:`FaissIndex` is exact inner-product search (FAISS ``IndexFlatIP``) over unit-length embeddings of a corpus;
the Haystack and LlamaIndex adapters search their own document store instead. Both implement :class:`DenseIndex`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from dro_plugins.data.examples import Passage


Hit = tuple[Passage, "torch.Tensor | None"]  # a passage and its document embedding [d] when the index keeps it


class DenseIndex(Protocol):
    def search(self, queries: torch.Tensor, n: int) -> list[list[Hit]]:
        """The top-``n`` passages by inner product for each query embedding ``[B, d]``, best first, each with its
        stored embedding (None where the store does not return it; the selector then embeds the passage)."""


class FaissIndex:
    """Exact maximum inner-product search over a corpus embedded once by the frozen document tower.

    Args:
        passages: the corpus.
        embeddings: ``[N, d]`` unit-length document embeddings, row i for ``passages[i]`` (the selector that searches
            it keeps them too, so hits carry none).
    """

    def __init__(self, passages: Sequence[Passage], embeddings: torch.Tensor):
        import faiss

        self.passages = list(passages)
        self.index = faiss.IndexFlatIP(embeddings.shape[1])
        self.index.add(embeddings.detach().float().cpu().numpy())

    def search(self, queries: torch.Tensor, n: int) -> list[list[Hit]]:
        _, rows = self.index.search(queries.detach().float().cpu().numpy(), min(n, len(self.passages)))
        return [[(self.passages[i], None) for i in row if i >= 0] for row in rows.tolist()]
