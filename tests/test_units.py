"""One base model with two adapters, the dtype policy, and adapter folders that peft loads."""

import json

import pytest
import torch
from peft import PeftModel

from dro_plugins.config import LoraConfig, RunConfig
from dro_plugins.data.examples import write_examples
from dro_plugins.modeling.loading import add_lora, load_pretrained
from dro_plugins.training.run_folder import RunPaths
from dro_plugins.build import build_models, shares_base
from dro_plugins.data.synthetic import make_dataset
from dro_plugins.training.trainer import DROTrainer
from dro_plugins.modeling.units import AdapterUnit
from tests.conftest import TINY_LORA, tiny_run_config


@pytest.fixture
def shared(tmp_path):
    train = write_examples(make_dataset(4, 8, seed=1), tmp_path / "train.jsonl")
    tree = tiny_run_config(str(train), str(train), str(tmp_path / "run"))
    config = RunConfig.model_validate(tree)
    selector, generator = build_models(config, tmp_path / "run")
    return config, selector, generator, list(make_dataset(4, 8, seed=1))


def _snapshot(unit):
    return {n: p.detach().clone() for n, p in unit.named_parameters()}


def test_one_base_in_memory(shared):
    _, selector, generator, _ = shared
    assert selector.model is generator.model
    assert set(selector.model.peft_config) == {"selector", "generator"}
    base = [p for n, p in selector.model.named_parameters() if "lora_" not in n and "modules_to_save" not in n]
    pointers = [p.untyped_storage().data_ptr() for p in base]
    assert len(pointers) == len(set(pointers))  # each base tensor stored once
    # and each role has its own, disjoint trainable parameters
    own = {role: {n for n, _ in u.named_parameters()} for role, u in (("s", selector.unit), ("g", generator.unit))}
    assert own["s"] and own["g"] and not own["s"] & own["g"]


@pytest.mark.parametrize("role", ["selector", "generator"])
def test_a_step_of_one_role_leaves_the_other_adapter_bit_identical(shared, tmp_path, role):
    config, selector, generator, questions = shared
    trainer = DROTrainer(config, selector, generator, questions, questions, tmp_path / "run")
    other = "generator" if role == "selector" else "selector"
    before = {r: _snapshot(trainer.units[r]) for r in (role, other)}
    permutations = torch.tensor([[[0, 1], [2, 3]]] * len(questions))
    trainer.step(role, questions, permutations, torch.full((len(questions), 2), 0.5), trainer.optimizers[role])
    after = {r: _snapshot(trainer.units[r]) for r in (role, other)}
    assert all(torch.equal(before[other][n], after[other][n]) for n in before[other])
    assert any(not torch.equal(before[role][n], after[role][n]) for n in before[role])
    # each optimizer holds exactly its own adapter's parameters
    held = {id(p) for group in trainer.optimizers[role].param_groups for p in group["params"]}
    assert held == {id(p) for p in trainer.units[role].parameters()}


def test_roles_score_with_their_own_adapter(shared):
    _, selector, generator, questions = shared
    with torch.no_grad():
        for _, p in generator.unit.named_parameters():
            p.add_(0.5)  # make the generator adapter differ from the selector's
        permutations = torch.tensor([[[0, 1]]])
        first = selector.log_prob(questions[:1], permutations)
        generator.log_likelihood(questions[:1], permutations)  # switches the shared model to the generator
        assert torch.equal(selector.log_prob(questions[:1], permutations), first)


def test_separate_bases_when_models_differ_or_an_old_run_has_two(tmp_path, tiny_model_dir):
    tree = tiny_run_config("t.jsonl", "v.jsonl", str(tmp_path / "run"))
    assert shares_base(RunConfig.model_validate(tree), tmp_path / "run")
    tree["generator"]["model"] = str(tiny_model_dir)
    assert not shares_base(RunConfig.model_validate(tree), tmp_path / "run")
    old = RunConfig.model_validate(tiny_run_config("t.jsonl", "v.jsonl", str(tmp_path / "old")))
    (RunPaths(tmp_path / "old").tiny_base("generator")).mkdir(parents=True)
    (RunPaths(tmp_path / "old").tiny_base("generator") / "config.json").write_text("{}")
    assert not shares_base(old, tmp_path / "old")  # written before bases were shared: load it as trained


def test_dtype_policy_bf16_base_float32_adapters(tiny_model_dir):
    model, _ = load_pretrained(str(tiny_model_dir), False, "generator.model", "cpu", torch.bfloat16)
    model = add_lora(model, LoraConfig(**{k: v for k, v in TINY_LORA.items() if k != "modules_to_save"}), name="generator")
    dtypes = {("lora_" in n): p.dtype for n, p in model.named_parameters()}
    assert dtypes == {True: torch.float32, False: torch.bfloat16}
    assert model.config._attn_implementation in ("sdpa", "eager")


def test_adapter_computes_in_the_base_dtype_for_inference_and_gets_its_float32_masters_back(tiny_model_dir):
    model, _ = load_pretrained(str(tiny_model_dir), False, "generator.model", "cpu", torch.bfloat16)
    model = add_lora(model, LoraConfig(**{k: v for k, v in TINY_LORA.items() if k != "modules_to_save"}), name="generator")
    unit = AdapterUnit(model, "generator")
    with torch.no_grad():
        for param in unit.parameters():  # a trained-looking adapter: lora_B is zero at initialisation
            param.add_(torch.randn_like(param) * 0.05)
    masters = {n: (p, p.data_ptr(), p.detach().clone()) for n, p in unit.named_parameters()}
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits.float()
        with unit.computing_in(torch.bfloat16):
            assert {p.dtype for p in unit.parameters()} == {torch.bfloat16}
            fast = model(input_ids=ids).logits.float()
    assert torch.allclose(fast, reference, atol=0.05, rtol=0.05) and not torch.equal(fast, reference)
    for name, param in unit.named_parameters():  # the same parameter objects, holding the same float32 tensors
        obj, pointer, value = masters[name]
        assert param is obj and param.data_ptr() == pointer and param.dtype == torch.float32 and torch.equal(param, value)


def test_saved_adapter_folder_loads_with_peft(shared, tmp_path, tiny_model_dir):
    _, selector, _, _ = shared
    folder = tmp_path / "saved"
    selector.unit.save(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(config["target_modules"])  # same file from run to run
    assert not list(folder.glob("*.partial"))
    base = selector.model.get_base_model()
    # a fresh unit on another copy of the weights: loading must reproduce the adapter exactly
    fresh = AdapterUnit(PeftModel.from_pretrained(type(base)(base.config), folder, adapter_name="selector"), "selector")
    saved = selector.unit.state_dict()
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in saved.items()}
    fresh.load_state_dict(saved)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
