"""Three trainable units in one run (``retriever.train``): the retriever's query tower and tau, the LM selector over
its pools, and the generator. The retriever's loss against a hand-computed value, where its gradients come from,
a run that trains all three and serves them, and resume after kill -9 inside the retriever's M-step."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import SHARED_DATA, TINY_LORA, make_trainer
from dro_plugins.config import load_config
from dro_plugins.data.examples import load_examples
from dro_plugins.errors import ConfigError
from dro_plugins.selectors import plackett_luce
from dro_plugins.selectors.retriever import embed
from dro_plugins.training import mstep
from dro_plugins.training.objective import selector_loss

NQ_TRAIN = SHARED_DATA / "nq" / "train.jsonl"
needs_data = pytest.mark.skipif(not NQ_TRAIN.is_file(), reason="../shared/data is not beside the checkout")


def test_retriever_loss_equals_the_hand_computed_value():
    """L_R = -sum_i w_i log p_R(z_i | x) with Plackett-Luce over 4 candidates' scores (2, 1, 0, -1):
    log p(0, 1) = (2 - log(e^2 + e + 1 + e^-1)) + (1 - log(e + 1 + e^-1)) = -0.847796
    log p(2, 0) = (0 - log(e^2 + e + 1 + e^-1)) + (2 - log(e^2 + e + e^-1)) = -2.789202
    with weights (0.75, 0.25): L_R = 0.75 * 0.847796 + 0.25 * 2.789202 = 1.333147."""
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0]], requires_grad=True)
    lists = torch.tensor([[[0, 1], [2, 0]]])
    loss = selector_loss(torch.tensor([[0.75, 0.25]]), plackett_luce.log_prob(scores, lists))
    assert loss.item() == pytest.approx(1.333147, abs=1e-5)
    loss.sum().backward()
    # dL/ds_l = sum_i w_i sum_j [ softmax_{remaining at j}(s)_l - 1{z_ij = l} ]: by hand for candidate 3 (never
    # picked, in every remaining set but one): 0.75 * (e^-1/11.4752 + e^-1/4.0862) + 0.25 * (e^-1/11.4752 + e^-1/10.4752)
    e = math.exp(-1)
    expected = 0.75 * (e / 11.475217 + e / 4.086161) + 0.25 * (e / 11.475217 + e / 10.475217)
    assert scores.grad[0, 3].item() == pytest.approx(expected, abs=1e-5)
    assert scores.grad.sum().item() == pytest.approx(0.0, abs=1e-6)  # Plackett-Luce ignores a shift of all scores


def test_corpus_normalisation_is_plackett_luce_over_the_whole_corpus():
    """log p_R(z | x) normalised over the corpus (chunked logsumexp, pool scores a subset) equals Plackett-Luce over
    all the corpus's scores, in value and in gradient with respect to the query and tau."""
    torch.manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(2, 5, dtype=torch.float64), dim=-1).requires_grad_()
    corpus = torch.nn.functional.normalize(torch.randn(9, 5, dtype=torch.float64), dim=-1)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    pools = torch.tensor([[0, 3, 5, 7], [1, 2, 4, 8]])
    lists = torch.tensor([[[0, 1], [2, 3]], [[3, 0], [1, 2]]])  # indices into the pools
    total = plackett_luce.corpus_logsumexp(queries, corpus, tau, chunk=4)  # three chunks, recomputed in backward
    pool_scores = torch.einsum("bd,bnd->bn", queries, corpus[pools]) / tau
    ours = plackett_luce.log_prob_over_corpus(pool_scores, lists, total)
    exact = plackett_luce.log_prob(queries @ corpus.T / tau, torch.stack([pools[b][lists[b]] for b in range(2)]))
    assert torch.allclose(ours, exact)
    assert not torch.allclose(ours, plackett_luce.log_prob(pool_scores, lists))  # the pool alone gives more mass
    for a, b in zip(torch.autograd.grad(ours.sum(), [queries, tau], retain_graph=True), torch.autograd.grad(exact.sum(), [queries, tau])):
        assert torch.allclose(a, b)


def three_unit_tree(tmp_path: Path, corpus: Path | None = None, **sections) -> dict:
    tree = {
        "data": {"train": str(NQ_TRAIN), "validation": str(NQ_TRAIN), "num_candidates": 6, "max_examples": 8},
        "selector": {"model": "tiny-llama", "top_k": 2, "max_passage_words": 12, "lora": dict(TINY_LORA)},
        "retriever": {"train": True, "max_seq_length": 64, "learning_rate": 1e-4} | ({"corpus": str(corpus)} if corpus else {}),
        "generator": {"model": "tiny-llama", "max_new_tokens": 4, "max_passage_words": 12, "lora": dict(TINY_LORA)},
        "dro": {"iterations": 1, "num_samples": 3, "batch_size": 4, "learning_rate": 3e-3},
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "report_to": "none",
    }
    for key, value in sections.items():
        tree[key] = tree.get(key, {}) | value
    return tree


def write_corpus(path: Path, questions: int = 8) -> Path:
    """The candidates of the first NQ training questions, as a corpus file."""
    passages = {p.id: p for ex in load_examples(NQ_TRAIN, 10, 2, questions) for p in ex.candidates}
    path.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in passages.values()))
    return path


def _grads(unit) -> dict[str, torch.Tensor | None]:
    return {name: None if p.grad is None else p.grad.clone() for name, p in unit.named_parameters()}


@needs_data
def test_gradients_reach_the_query_tower_and_temperature_only_through_the_retriever_loss(tmp_path):
    trainer = make_trainer(three_unit_tree(tmp_path, dro={"max_grad_norm": 1e9}))  # no clipping: raw gradients
    session, units = trainer.session, trainer.units
    assert list(units) == ["selector", "generator", "retriever"]
    batch = trainer.train_set[:3]
    lists = torch.stack([torch.randperm(6, generator=torch.Generator().manual_seed(i))[:2] for i in range(9)]).view(3, 3, 2)
    weights = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]])
    retriever = session.retriever

    def clear():
        for unit in units.values():
            for p in unit.parameters():
                p.grad = None

    # the retriever's gradient is that of the batch mean of L_R, computed here directly
    clear()
    selector_loss(weights, retriever.log_prob(batch, lists)).mean().backward()
    direct = _grads(units["retriever"])
    for role in ("selector", "generator"):  # their steps leave the retriever without a gradient
        clear()
        mstep.optimizer_step(session, role, batch, lists, weights, trainer.optimizers[role])
        assert all(g is None for g in _grads(units["retriever"]).values()), role
        assert any(g is not None and g.abs().sum() > 0 for g in _grads(units[role]).values()), role
    clear()
    mstep.optimizer_step(session, "retriever", batch, lists, weights, trainer.optimizers["retriever"])
    stepped = _grads(units["retriever"])
    assert all(g is None for role in ("selector", "generator") for g in _grads(units[role]).values())
    assert stepped["log_temperature"].abs().item() > 0
    reached = [n for n, g in stepped.items() if n.startswith("encoder.") and g is not None and g.abs().sum() > 0]
    assert len(reached) >= 0.9 * sum(n.startswith("encoder.") for n in stepped)
    for name, grad in stepped.items():  # (a layer the output does not use, e.g. a pooler, has none either way)
        assert (grad is None and direct[name] is None) or torch.allclose(grad, direct[name], atol=1e-6, rtol=1e-4), name
    assert all(p.grad is None and not p.requires_grad for p in retriever.document_encoder.parameters())


@needs_data
def test_a_three_unit_run_trains_all_three_and_loads_them_back(tmp_path):
    from dro_plugins import api
    from dro_plugins.build import load_trained

    tree = three_unit_tree(tmp_path, write_corpus(tmp_path / "corpus.jsonl"))
    trainer = make_trainer(tree)
    initial = {role: {n: p.detach().clone() for n, p in unit.named_parameters()} for role, unit in trainer.units.items()}
    report = trainer.fit()
    for role, unit in trainer.units.items():  # every unit moved
        assert any(not torch.equal(p.detach(), initial[role][n]) for n, p in unit.named_parameters()), role
    run = Path(tree["output_dir"])
    lines = [json.loads(line) for line in (run / "samples" / "iteration_001.jsonl").read_text().splitlines()]
    assert all(len(line["candidates"]) == 6 for line in lines)  # pools re-retrieved by the retriever, saved with samples
    last = report["history"][-1]
    assert {"selector_loss", "generator_loss", "retriever_loss", "pool_recall"} <= set(last)
    assert "pool_recall" in report["validation"] and "pool_recall" in report["baseline"]
    assert (run / "retriever" / "modules.json").is_file() and (run / "retriever" / "temperature.json").is_file()

    # the run folder loads with its trained retriever in front of the LM selector
    _, selector, _ = load_trained(run)
    questions = ["who sang i will always love you", "when was the eiffel tower built"]
    served, trained = embed(selector.retriever.model.encoder, questions), embed(trainer.session.retriever.model.encoder, questions)
    assert torch.allclose(served, trained, atol=1e-5)
    assert selector.retriever.model.temperature == pytest.approx(trainer.session.retriever.model.temperature)
    scored = api.evaluate(run, NQ_TRAIN, max_examples=4)
    assert all(len(p["selected"]) == 2 for p in scored["predictions"]) and "pool_recall" in scored


def test_retriever_train_needs_an_lm_selector(write_config):
    with pytest.raises(ConfigError, match="selector.kind is 'retriever'"):
        load_config(write_config({
            "data": {"train": "t.jsonl", "validation": "v.jsonl"}, "selector": {"kind": "retriever"},
            "retriever": {"train": True}, "generator": {"model": "tiny-llama"},
        }))


def test_an_output_dir_holding_the_retrievers_corpus_is_refused(tmp_path):
    """``--restart`` there would delete the user's corpus: the retriever's corpus counts as an input like any other."""
    from dro_plugins.config import RunConfig
    from dro_plugins.training.run_folder import config_inputs

    corpus = tmp_path / "data" / "corpus.jsonl"
    config = RunConfig.model_validate(three_unit_tree(tmp_path, corpus))
    assert corpus in config_inputs(config, None)


def _optimize(root: Path, name: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    tree = three_unit_tree(root, root / "corpus.jsonl", dro={"iterations": 2, "patience": 5}) | {"output_dir": str(root / name)}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(tree))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRO_KILL")} | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if kill_at:
        env["DRO_KILL_AT"] = kill_at
    command = [sys.executable, "-m", "dro_plugins.cli.main", "optimize", str(root / f"{name}.yaml")]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


def _result(run: Path) -> tuple:
    strip = lambda line: {k: v for k, v in line.items() if k != "throughput"}  # noqa: E731 - wall-clock figures
    history = [strip(line) for line in json.loads((run / "report.json").read_text())["history"]]
    return history, (run / "retriever" / "model.safetensors").read_bytes(), (run / "retriever" / "temperature.json").read_text()


@pytest.mark.slow
@needs_data
def test_kill_9_in_the_retrievers_m_step_resumes_to_the_uninterrupted_result(tmp_path):
    write_corpus(tmp_path / "corpus.jsonl")
    whole = _optimize(tmp_path, "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _optimize(tmp_path, "killed", kill_at="m-step-retriever:3")  # iteration 2's first retriever step
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = _optimize(tmp_path, "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at iteration 2, phase m-step" in resumed.stdout + resumed.stderr
    assert _result(tmp_path / "killed") == _result(tmp_path / "whole")
