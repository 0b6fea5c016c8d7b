"""The retriever selector: Plackett-Luce math against enumeration, exact Gumbel top-k sampling, what trains, and a
DRO run that moves what is retrieved."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, TINY_LORA, make_trainer
from dro_plugins.config import MINILM, RunConfig
from dro_plugins.data.examples import Example, Passage, load_examples
from dro_plugins.modeling.loading import load_sentence_encoder
from dro_plugins.selectors import plackett_luce
from dro_plugins.selectors.index import FaissIndex
from dro_plugins.selectors.retriever import BiEncoderScorer, RetrieverSelector, embed, passage_text
from dro_plugins.data.supervision import positive_candidates

NQ_TRAIN = SHARED_DATA / "nq" / "train.jsonl"


def brute_force(scores: list[float], perm: tuple[int, ...]) -> float:
    """log p(z) by the definition: pick z_j with probability exp(s) / sum of the remaining exp(s), in float64."""
    remaining, total = set(range(len(scores))), 0.0
    for index in perm:
        total += scores[index] - math.log(sum(math.exp(scores[i]) for i in remaining))
        remaining.remove(index)
    return total


@pytest.mark.parametrize(("n", "k"), [(4, 1), (5, 3), (6, 6)])
def test_plackett_luce_log_prob_equals_enumeration(n, k):
    scores = torch.randn(2, n, generator=torch.Generator().manual_seed(n + k), dtype=torch.float64) * 2
    perms = torch.tensor(list(itertools.permutations(range(n), k)))
    lp = plackett_luce.log_prob(scores, perms[None].expand(2, -1, -1))
    for b in range(2):
        expected = torch.tensor([brute_force(scores[b].tolist(), tuple(p)) for p in perms.tolist()], dtype=torch.float64)
        assert torch.allclose(lp[b].double(), expected, atol=1e-6)
        assert lp[b].exp().sum().item() == pytest.approx(1.0, abs=1e-5)  # a distribution over all top-k lists


def test_plackett_luce_ignores_padding_candidates():
    scores = torch.tensor([[1.0, 0.5, -0.3, 9.0, 9.0]])
    valid = torch.tensor([[True, True, True, False, False]])
    perms = torch.tensor([[[2, 0], [1, 2]]])
    lp = plackett_luce.log_prob(scores, perms, valid)
    expected = [brute_force([1.0, 0.5, -0.3], (2, 0)), brute_force([1.0, 0.5, -0.3], (1, 2))]
    assert torch.allclose(lp[0].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    noise = torch.zeros(1, 3, 5)
    assert set(plackett_luce.gumbel_top_k(scores, 3, noise, valid).flatten().tolist()) == {0, 1, 2}


def test_gumbel_top_k_frequencies_match_the_exact_probabilities():
    """Chi-square goodness of fit of 20,000 draws over the 12 top-2 lists of 4 candidates (fixed seed)."""
    scores = torch.tensor([[1.5, 0.2, -0.4, 0.9]])
    perms = list(itertools.permutations(range(4), 2))
    exact = plackett_luce.log_prob(scores, torch.tensor(perms)[None]).exp()[0].double()
    draws = 20_000
    noise = -torch.log(-torch.log(torch.rand(1, draws, 4, generator=torch.Generator().manual_seed(0))))
    sampled = plackett_luce.gumbel_top_k(scores, 2, noise)[0]
    counts = torch.zeros(len(perms), dtype=torch.float64)
    for p in sampled.tolist():
        counts[perms.index(tuple(p))] += 1
    chi_square = ((counts - draws * exact) ** 2 / (draws * exact)).sum().item()
    assert chi_square < 31.26  # the 0.999 quantile of chi-square with 11 degrees of freedom
    # and a sampler that ignored the scores would fail it
    uniform = ((torch.full_like(exact, draws / 12) - draws * exact) ** 2 / (draws * exact)).sum().item()
    assert uniform > 1000


@pytest.fixture(scope="module")
def encoders():
    return load_sentence_encoder(MINILM, "selector.model", "cpu", 64), load_sentence_encoder(MINILM, "selector.document_model", "cpu", 64)


def fresh_selector(encoders, top_k=2, index=None, num_candidates=6) -> RetrieverSelector:
    """A retriever selector on MiniLM with the module's encoders' initial weights (restored for each test)."""
    query, documents = encoders
    query.load_state_dict(documents.state_dict())
    return RetrieverSelector(BiEncoderScorer(query, 0.05), documents, top_k, index=index, num_candidates=num_candidates)


def toy_examples() -> list[Example]:
    passages = (
        Passage("0", "Paris", "Paris is the capital of France."),
        Passage("1", "Tokyo", "Tokyo is the capital of Japan."),
        Passage("2", "Bread", "Bread is baked from flour and water."),
        Passage("3", "Rome", "Rome is the capital of Italy."),
    )
    return [
        Example("q1", "what is the capital of japan", ("Tokyo",), passages),
        Example("q2", "how is bread made", ("flour",), passages[:3]),
    ]


def test_retriever_selector_samples_are_exact_and_reproducible(encoders):
    selector = fresh_selector(encoders)
    batch = toy_examples()
    assert [picked[0] for picked in selector.select(batch)] == [1, 2]  # MiniLM ranks Tokyo and Bread first
    draws = selector.sample(batch, 16, temperature=2.0, rng=7)
    assert draws.permutations.shape == (2, 16, 2)
    assert (draws.permutations[1] < 3).all()  # q2 has 3 candidates: padding is never drawn
    with torch.no_grad():
        rescored = selector.log_prob(batch, draws.permutations, temperature=2.0)
    assert torch.allclose(rescored, draws.log_probs, atol=1e-5)
    alone = selector.sample(batch[1:], 16, temperature=2.0, rng=7)  # a question's draws ignore its batch neighbours
    assert torch.equal(alone.permutations[0], draws.permutations[1])


def test_gradients_reach_the_query_tower_and_temperature_only(encoders):
    selector = fresh_selector(encoders)
    batch = toy_examples()
    loss = -selector.log_prob(batch, torch.tensor([[[0, 2]], [[1, 0]]])).sum()
    loss.backward()
    names = dict(selector.unit.named_parameters())
    assert names["log_temperature"].grad is not None and names["log_temperature"].grad.abs().item() > 0
    query = [p for n, p in names.items() if n.startswith("encoder.")]
    reached = [p for p in query if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(query) > 90 and len(reached) >= 0.9 * len(query)
    assert all(p.grad is None and not p.requires_grad for p in selector.document_encoder.parameters())
    groups = selector.unit.parameter_groups(2e-5)
    assert [g["lr"] for g in groups] == [2e-5, 1e-2] and groups[1]["params"] == [names["log_temperature"]]


def test_query_tower_saves_as_a_sentence_transformers_folder(encoders, tmp_path):
    from sentence_transformers import SentenceTransformer

    selector = fresh_selector(encoders)
    with torch.no_grad():
        selector.model.log_temperature.fill_(math.log(0.2))
        next(selector.model.encoder.parameters()).add_(0.01)
    selector.unit.save(tmp_path / "selector")
    served = SentenceTransformer(str(tmp_path / "selector"), device="cpu")
    questions = ["what is the capital of japan"]
    assert torch.allclose(embed(served, questions), embed(selector.model.encoder, questions), atol=1e-5)
    other = fresh_selector(encoders)
    assert other.model.temperature == pytest.approx(0.05)
    other.unit.load(tmp_path / "selector")
    assert other.model.temperature == pytest.approx(0.2)
    assert torch.allclose(embed(other.model.encoder, questions), embed(served, questions), atol=1e-5)


def nq_questions(count: int, num_candidates: int = 8) -> list[Example]:
    return load_examples(NQ_TRAIN, num_candidates, 2, count)


def test_supervised_selector_steps_move_the_positives_up(encoders):
    """Learning that must happen: the M-step's loss with all weight on the labelled positives raises their score."""
    selector = fresh_selector(encoders, top_k=1)
    batch = [ex for ex in nq_questions(60) if positive_candidates(ex) and selector.select([ex])[0][0] not in positive_candidates(ex)][:6]
    assert len(batch) >= 4
    targets = torch.tensor([[[positive_candidates(ex)[0]]] for ex in batch])
    before = selector.log_prob(batch, targets).detach()
    optimizer = torch.optim.AdamW(selector.unit.parameter_groups(1e-4))
    for _ in range(8):
        optimizer.zero_grad()
        (-selector.log_prob(batch, targets).sum()).backward()
        optimizer.step()
    after = selector.log_prob(batch, targets).detach()
    assert (after > before).all()
    hits = sum(selector.select([ex])[0][0] in positive_candidates(ex) for ex in batch)
    assert hits >= len(batch) // 2  # from 0: most now rank a positive first


def test_candidates_are_re_retrieved_from_the_index(encoders):
    corpus = [p for ex in nq_questions(6) for p in ex.candidates]
    unique = list({(p.title, p.text): p for p in corpus}.values())
    index = FaissIndex(unique, embed(encoders[1], [passage_text(p) for p in unique]))
    selector = fresh_selector(encoders, index=index, num_candidates=5)
    questions = [Example(ex.id, ex.question, ex.answers, ()) for ex in nq_questions(6)]
    pooled = selector.candidates(questions)
    assert [len(ex.candidates) for ex in pooled] == [5] * 6
    # the pool is the top-5 by the current query tower: its greedy top-2 is the pool's first two
    assert all(selector.select([ex])[0] == [0, 1] for ex in pooled)
    assert all(p.has_answer is not None for ex in pooled for p in ex.candidates)
    with torch.no_grad():  # a different query tower retrieves differently
        for param in selector.model.encoder.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    moved = selector.candidates(questions)
    assert any([p.id for p in a.candidates] != [p.id for p in b.candidates] for a, b in zip(pooled, moved))


def retriever_run(tmp_path: Path, **sections) -> dict:
    tree = {
        "data": {"train": str(NQ_TRAIN), "validation": str(NQ_TRAIN), "num_candidates": 6, "max_examples": 8},
        "selector": {"kind": "retriever", "top_k": 2, "max_seq_length": 64},
        "generator": {"model": "tiny-llama", "max_new_tokens": 4, "max_passage_words": 12, "lora": dict(TINY_LORA)},
        "dro": {"iterations": 1, "num_samples": 3, "batch_size": 4, "learning_rate": 3e-3},
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "report_to": "none",
    }
    for key, value in sections.items():
        tree[key] = tree.get(key, {}) | value if isinstance(value, dict) else value
    return tree


def test_a_dro_run_trains_the_retriever_and_resumes(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    passages = {p.id: p for ex in nq_questions(8, 10) for p in ex.candidates}
    corpus.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in passages.values()))
    tree = retriever_run(tmp_path, selector={"kind": "retriever", "top_k": 2, "max_seq_length": 64, "corpus": str(corpus)})
    trainer = make_trainer(tree)
    initial = {n: p.detach().clone() for n, p in trainer.selector.unit.named_parameters()}
    report = trainer.fit()
    run = Path(tree["output_dir"])
    lines = [json.loads(line) for line in (run / "samples" / "iteration_001.jsonl").read_text().splitlines()]
    assert all(len(line["candidates"]) == 6 for line in lines)  # pools re-retrieved from the corpus, saved with samples
    assert all(max(max(p) for p in line["permutations"]) < 6 for line in lines)
    changed = [n for n, p in trainer.selector.unit.named_parameters() if not torch.equal(p.detach(), initial[n])]
    assert "log_temperature" in changed and any(n.startswith("encoder.") for n in changed)
    assert (run / "selector" / "modules.json").is_file() and (run / "selector" / "temperature.json").is_file()
    assert list((run / "index").glob("embeddings-*.safetensors"))
    assert len(report["history"]) == 2
    # resume: a finished run loads its checkpoint (query tower included) and writes the same report
    again = make_trainer(tree).fit()
    assert again["history"] == report["history"]

    # the CLI reads the run: inspect shows the pool each sample was drawn from, evaluate re-retrieves from the corpus
    from typer.testing import CliRunner

    from dro_plugins.cli.main import app

    shown = CliRunner().invoke(app, ["inspect", str(run), "--question", lines[0]["id"], "--iteration", "1"])
    assert shown.exit_code == 0, shown.output
    assert "the pool retrieved at E-step 1" in shown.output
    scored = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(NQ_TRAIN), "--max-examples", "4"])
    assert scored.exit_code == 0, scored.output
    predictions = json.loads((run / "evaluation_train.json").read_text())["predictions"]
    assert len(predictions) == 4 and all(len(p["selected"]) == 2 for p in predictions)


def test_retriever_config_is_validated_per_kind(write_config):
    from dro_plugins.config import load_config
    from dro_plugins.errors import ConfigError

    tree = retriever_run(Path("/tmp"))
    tree["selector"]["lora"] = {"rank": 4}
    with pytest.raises(ConfigError, match="selector.lora: unknown key for selector.kind retriever"):
        load_config(write_config(tree))
    tree["selector"] = {"kind": "reranker"}
    with pytest.raises(ConfigError, match="selector.kind must be 'lm' or 'retriever'"):
        load_config(write_config(tree))
    assert RunConfig.model_validate(retriever_run(Path("/tmp"))).selector.temperature == 0.05


def test_query_prefix_is_embedded_with_the_question(encoders):
    selector = fresh_selector(encoders)
    selector.query_prefix, selector.query_suffix = "query: ", " ?"
    batch = toy_examples()[:1]
    with torch.no_grad():
        scores, _ = selector.scores(batch)
        documents, _ = selector.documents(batch)
    query = embed(selector.model.encoder, ["query: " + batch[0].question + " ?"])
    assert torch.allclose(scores, query @ documents[0].T / 0.05, atol=1e-4)
    plain = embed(selector.model.encoder, [batch[0].question])
    assert not torch.allclose(scores, plain @ documents[0].T / 0.05, atol=1e-2)


@pytest.mark.parametrize("constrained", [True, False])
def test_dro_selector_from_a_retriever_run_orders_documents_by_the_trained_retriever(tmp_path, constrained):
    from haystack import Document

    from dro_plugins.build import load_trained_selector
    from dro_plugins.data.examples import Example
    from dro_plugins.errors import DROError
    from haystack_integrations.components.rankers.dro import DROSelector

    tree = retriever_run(tmp_path)
    make_trainer(tree).fit()
    run = tree["output_dir"]
    trained = load_trained_selector(run, "cpu")

    def ranking(question):
        with torch.no_grad():
            scores, _ = trained.scores([Example("q", question.question, ("",), question.candidates)])
        return scores[0].argsort(descending=True)[:2].tolist()

    question = next(q for q in nq_questions(8, 6) if ranking(q) != [0, 1])  # a fallback to the input order would show
    documents = [Document(id=p.id, content=p.text, meta={"title": p.title}) for p in question.candidates]
    expected = [documents[i].id for i in ranking(question)]

    component = DROSelector(model=run, top_k=2, device="cpu", constrained=constrained)
    picked = [d.id for d in component.run(query=question.question, documents=documents)["documents"]]

    assert picked == expected  # the retriever's own ranking, not the input order (nor a silent fallback)
    with pytest.raises(DROError, match="max_passage_words does not apply"):
        DROSelector(model=run, top_k=2, device="cpu", max_passage_words=10).warm_up()


def test_out_of_memory_advice_names_only_keys_a_retriever_run_has(tmp_path):
    from dro_plugins.training.session import memory_advice

    advice = memory_advice(RunConfig.model_validate(retriever_run(tmp_path)))
    assert "generator.gradient_checkpointing" in advice and "generator.max_passage_words" in advice
    assert "selector.gradient_checkpointing" not in advice and "selector.max_passage_words" not in advice
