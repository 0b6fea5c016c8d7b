"""The retriever selector: a bi-encoder's similarity scores and a Plackett-Luce distribution over top-k lists.

Scores ``s_i = cos(q(x), d_i) / tau`` come from a sentence-transformers query tower ``q`` (trainable, in full) and a
frozen document tower ``d`` (so a pipeline's document index stays valid without re-embedding), with a trainable
temperature ``tau``. ``p(z | x)`` is Plackett-Luce over the question's pool (:mod:`dro_plugins.selectors.plackett_luce`):
exact ``log_prob``, exact samples by Gumbel top-k, greedy selection = the top-k by score, which is what the
retriever itself returns. Iteration 0 is therefore the pretrained retriever's own ranking.

With an index (:class:`dro_plugins.selectors.index.DenseIndex`), :meth:`RetrieverSelector.candidates` re-retrieves
each question's pool as the index's top-n for the current query tower, so training moves what is retrieved, not
only the order of a fixed list. ``p(z | x)`` is then normalised over that top-n pool instead of the whole corpus
(the approximation RePlug and Atlas make): the passages outside the pool get no probability mass. A larger n makes
the approximation tighter (at n = corpus size it is exact) and the E-step samples more varied; with the peaked
scores of a trained retriever the mass beyond the top few dozen is small.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch

from dro_plugins.modeling.batching import Shape
from dro_plugins.data.examples import Example, Passage
from dro_plugins.data.labels import passage_has_answer
from dro_plugins.selectors import plackett_luce
from dro_plugins.selectors.base import SampleBatch, draw_seed, gumbel_noise, question_seed
from dro_plugins.modeling.units import EncoderUnit

EMBEDDING_BATCH = 64  # passages per forward of the document tower


def passage_text(passage: Passage) -> str:
    """The text a document tower embeds: title and text on two lines (Haystack's ``meta_fields_to_embed=["title"]``
    with its default separator)."""
    return f"{passage.title}\n{passage.text}" if passage.title else passage.text


def features_on(encoder, texts: Sequence[str], device: torch.device) -> dict:
    """``encoder.preprocess(texts)`` with its tensors on ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in encoder.preprocess(list(texts)).items()}


@torch.no_grad()
def embed(encoder, texts: Sequence[str], batch_size: int = EMBEDDING_BATCH) -> torch.Tensor:
    """Unit-length embeddings ``[N, d]`` (float32, on the encoder's device) of ``texts``, without gradient."""
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    out = [
        torch.nn.functional.normalize(encoder(features_on(encoder, texts[i : i + batch_size], device))["sentence_embedding"].float(), dim=-1)
        for i in range(0, len(texts), batch_size)
    ]
    encoder.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, encoder.get_embedding_dimension(), device=device)


class BiEncoderScorer(torch.nn.Module):
    """The trainable part of the retriever selector: the query tower and ``log tau``, one module so that a
    data-parallel wrapper sees (and averages) every trainable parameter.

    Args:
        query_encoder: a ``SentenceTransformer``.
        temperature: initial tau (cosine similarities are divided by it).
        train_temperature: whether tau is trained.
        temperature_learning_rate: the learning rate of ``log tau``.
    """

    def __init__(self, query_encoder, temperature: float, train_temperature: bool = True, temperature_learning_rate: float = 1e-2):
        super().__init__()
        self.encoder = query_encoder.eval()
        self.train_temperature = train_temperature
        self.temperature_learning_rate = temperature_learning_rate
        self.log_temperature = torch.nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=train_temperature)

    @property
    def temperature(self) -> float:
        return self.log_temperature.detach().exp().item()

    def train(self, mode: bool = True) -> BiEncoderScorer:
        """Keep the encoder's dropout off in training too: log p(z | x) must be the same function when the E-step
        samples and when the M-step scores, or the importance weights are not exact."""
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, features: dict, documents: torch.Tensor, corpus: torch.Tensor | None = None):
        """Scores ``[B, n]`` = cos(q, d_i) / tau for queries ``features`` (B texts) and unit documents ``[B, n, d]``;
        with ``corpus`` (``[N, d]`` unit document embeddings), also ``logsumexp_i cos(q, d_i) / tau`` over it ``[B]``
        (:func:`~dro_plugins.selectors.plackett_luce.corpus_logsumexp`), as ``(scores, corpus_logsumexp)``."""
        queries = torch.nn.functional.normalize(self.encoder(features)["sentence_embedding"].float(), dim=-1)
        temperature = self.log_temperature.exp()
        scores = torch.einsum("bd,bnd->bn", queries, documents) / temperature
        if corpus is None:
            return scores
        return scores, plackett_luce.corpus_logsumexp(queries, corpus, temperature)


class RetrieverSelector:
    """A Plackett-Luce selector over a bi-encoder's scores (``selector.kind: retriever``).

    Args:
        scorer: the query tower and temperature (:class:`BiEncoderScorer`).
        document_encoder: the frozen document tower (a ``SentenceTransformer``).
        top_k: k.
        index: where :meth:`candidates` re-retrieves pools from; None keeps the questions' own pools.
        num_candidates: n, the pool size re-retrieved from ``index``.
        query_prefix, query_suffix: put around each question before the query tower embeds it (as the pipeline's
            text embedder does).
        corpus_embeddings: ``[N, d]`` unit document embeddings of the whole corpus: :meth:`log_prob` then normalises
            over the corpus (``retriever.normalization: corpus``), not over the pool; None: over the pool.
    """

    def __init__(
        self, scorer: BiEncoderScorer, document_encoder, top_k: int, index=None, num_candidates: int = 20,
        query_prefix: str = "", query_suffix: str = "", corpus_embeddings: torch.Tensor | None = None,
    ):
        self.model = scorer
        self.corpus_embeddings = corpus_embeddings
        self.query_prefix, self.query_suffix = query_prefix, query_suffix
        self.document_encoder = document_encoder.requires_grad_(False)
        self.top_k = top_k
        self.index = index
        self.num_candidates = num_candidates
        self.unit = EncoderUnit(scorer)
        self.tokenizer = scorer.encoder.tokenizer
        self._documents: dict[tuple[str, str], torch.Tensor] = {}  # passage (title, text) -> unit embedding [d]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def remember(self, passages: Sequence[Passage], embeddings: torch.Tensor) -> None:
        """Keep document-tower embeddings ``[N, d]`` computed elsewhere (an index built with the same tower), as unit
        vectors."""
        for passage, vector in zip(passages, torch.nn.functional.normalize(embeddings.float(), dim=-1)):
            self._documents[(passage.title, passage.text)] = vector.to(self.device)

    def documents(self, batch: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """Document embeddings ``[B, n, d]`` of each question's pool (zeros past its end) and ``valid`` ``[B, n]``.

        The document tower is frozen, so each passage is embedded once and kept.
        """
        missing = {(p.title, p.text): p for ex in batch for p in ex.candidates if (p.title, p.text) not in self._documents}
        if missing:
            self.remember(list(missing.values()), embed(self.document_encoder, [passage_text(p) for p in missing.values()]))
        width = max(len(ex.candidates) for ex in batch)
        dim = self.document_encoder.get_embedding_dimension()
        documents = torch.zeros(len(batch), width, dim, device=self.device)
        valid = torch.zeros(len(batch), width, dtype=torch.bool, device=self.device)
        for b, example in enumerate(batch):
            if example.candidates:
                documents[b, : len(example.candidates)] = torch.stack([self._documents[(p.title, p.text)] for p in example.candidates])
            valid[b, : len(example.candidates)] = True
        return documents, valid

    def scores(self, batch: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """``s = cos(q(x), d_i) / tau`` ``[B, n]`` (differentiable when grad is enabled) and ``valid`` ``[B, n]``."""
        documents, valid = self.documents(batch)
        features = features_on(self.model.encoder, self._queries(batch), self.device)
        return self.unit.scoring_model()(features, documents), valid

    def _queries(self, batch: Sequence[Example]) -> list[str]:
        return [f"{self.query_prefix}{ex.question}{self.query_suffix}" for ex in batch]

    def shape(self, example: Example, num_samples: int, top_k: int | None = None) -> Shape:
        """One row: the question's tokens (the pool's embeddings are kept, not recomputed)."""
        return Shape(1, len(self.tokenizer(self._queries([example])[0])["input_ids"]))

    @torch.no_grad()
    def sample(self, batch: Sequence[Example], num_samples: int, temperature: float = 1.0, rng=None) -> SampleBatch:
        """m exact Plackett-Luce draws per question at ``temperature`` (Gumbel top-k on ``s / temperature``).

        Each question's noise is seeded from ``(seed, question id)``, so draws do not depend on batch neighbours.

        Returns:
            permutations ``[B, m, k]`` and their log-probs ``[B, m]`` at ``temperature`` (CPU).
        """
        seed = draw_seed(rng)
        scores, valid = self.scores(batch)
        scores = scores / temperature
        noise = torch.zeros(len(batch), num_samples, scores.shape[1])
        for b, example in enumerate(batch):
            noise[b, :, : len(example.candidates)] = gumbel_noise(question_seed(seed, example.id), num_samples, len(example.candidates))
        permutations = plackett_luce.gumbel_top_k(scores, self.top_k, noise, valid)
        return SampleBatch(permutations.cpu(), plackett_luce.log_prob(scores, permutations, valid).cpu())

    def log_prob(self, batch: Sequence[Example], permutations: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Differentiable Plackett-Luce log p(z | x) ``[B, m]`` of ``permutations`` ``[B, m, k]`` (float32), normalised
        over each question's pool, or over the whole corpus with ``corpus_embeddings`` (then ``temperature`` is 1).

        Gradients reach the query tower and tau only; the document embeddings are constants.
        """
        if self.corpus_embeddings is None:
            scores, valid = self.scores(batch)
            return plackett_luce.log_prob(scores / temperature, permutations.to(scores.device), valid)
        documents, _ = self.documents(batch)
        features = features_on(self.model.encoder, self._queries(batch), self.device)
        corpus = self.corpus_embeddings.to(self.device)
        scores, total = self.unit.scoring_model()(features, documents, corpus)
        return plackett_luce.log_prob_over_corpus(scores, permutations.to(scores.device), total)

    @torch.no_grad()
    def select(self, batch: Sequence[Example], k: int | None = None) -> list[list[int]]:
        """The top-k candidates by score, best first (the most likely Plackett-Luce list)."""
        scores, valid = self.scores(batch)
        return plackett_luce.greedy(scores, min(k or self.top_k, scores.shape[1]), valid).tolist()

    @torch.no_grad()
    def candidates(self, batch: Sequence[Example]) -> list[Example]:
        """Each question with the index's top-n passages for the current query tower (labelled ``has_answer`` by
        answer match), or unchanged without an index."""
        if self.index is None or not batch:
            return list(batch)
        queries = embed(self.model.encoder, self._queries(batch))
        pools = self.index.search(queries, self.num_candidates)
        stored = [(p, vector) for pool in pools for p, vector in pool if vector is not None]
        if stored:  # score with the store's own document embeddings
            self.remember([p for p, _ in stored], torch.stack([torch.as_tensor(v, dtype=torch.float32) for _, v in stored]))
        return [
            replace(ex, candidates=tuple(replace(p, has_answer=passage_has_answer(p, ex.answers)) for p, _ in pool))
            for ex, pool in zip(batch, pools)
        ]
