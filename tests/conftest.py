"""Shared fixtures: offline hub, small thread count, tiny models and synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")  # the tests run offline: no telemetry retries

import pytest
import torch
import yaml

from dro_plugins.config import LoraConfig, RunConfig, TinyModelConfig
from dro_plugins.data.examples import load_run_data
from dro_plugins.modeling.loading import add_lora, build_tiny_model, tiny_tokenizer, write_tiny_model
from dro_plugins.build import build_models
from dro_plugins.training.trainer import DROTrainer

TINY_LORA = {"rank": 8, "alpha": 16, "modules_to_save": ["embed_tokens", "lm_head"]}


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random causal LM folder (as `dro tiny-model` writes it), shared by the framework adapter tests."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=5)


@pytest.fixture
def tiny_lm(tokenizer):
    """A fresh tiny Llama with LoRA adapters (and trainable embeddings), float32 on CPU."""

    def make(seed: int = 0, modules_to_save=("embed_tokens", "lm_head")):
        model = build_tiny_model("tiny-llama", TinyModelConfig(), tokenizer, seed)
        return add_lora(model, LoraConfig(modules_to_save=list(modules_to_save) or None))

    return make


@pytest.fixture
def write_config(tmp_path):
    """Write a run config YAML (a dict) into tmp_path and return its path."""

    def write(tree: dict, name: str = "config.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(tree))
        return path

    return write


def tiny_run_config(train: str, validation: str, output_dir: str, **sections) -> dict:
    """A run config tree for tiny models; ``sections`` are merged into the defaults."""
    tree = {
        "data": {"train": train, "validation": validation, "num_candidates": 8},
        "selector": {"model": "tiny-llama", "top_k": 2, "lora": dict(TINY_LORA)},
        "generator": {"model": "tiny-llama", "max_new_tokens": 4, "lora": dict(TINY_LORA)},
        "dro": {"iterations": 1, "num_samples": 2, "batch_size": 8, "learning_rate": 3e-3},
        "output_dir": output_dir,
        "device": "cpu",
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            tree.setdefault(key, {}).update(value)
        else:
            tree[key] = value
    return tree


def make_trainer(tree: dict) -> DROTrainer:
    """A DROTrainer for a run config tree: fresh models in its output_dir, the data files it names."""
    config = RunConfig.model_validate(tree)
    selector, generator = build_models(config, Path(config.output_dir))
    return DROTrainer(config, selector, generator, *load_run_data(config), Path(config.output_dir))


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip cleanly where no CUDA GPU is visible (CI has none)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


REAL_TOKENIZERS = ("llama3", "qwen3")


@pytest.fixture(scope="session")
def real_tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    """The real Llama 3 and Qwen 3 tokenizers of ../shared/tokenizers, unpacked into a temporary folder."""
    import lzma
    import shutil

    source = SHARED_DATA.parent / "tokenizers"
    if not source.is_dir():
        pytest.skip("../shared/tokenizers is not beside the checkout")
    root = tmp_path_factory.mktemp("tokenizers")
    folders = {}
    for name in REAL_TOKENIZERS:
        folder = root / name
        folder.mkdir()
        shutil.copy(source / name / "tokenizer_config.json", folder)
        (folder / "tokenizer.json").write_bytes(lzma.decompress((source / name / "tokenizer.json.xz").read_bytes()))
        folders[name] = folder
    return folders


@pytest.fixture(scope="session")
def real_tiny_model_dirs(tmp_path_factory, real_tokenizer_dirs) -> dict[str, Path]:
    """Tiny random models with the real tokenizers' vocabularies and chat templates, as `dro tiny-model --tokenizer` writes."""
    root = tmp_path_factory.mktemp("real-tiny")
    return {name: write_tiny_model(root / name, seed=2, tokenizer_dir=folder) for name, folder in real_tokenizer_dirs.items()}
