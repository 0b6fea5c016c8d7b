"""`dro tiny-model FOLDER`: a random causal LM on disk that loads like any Hugging Face model path, offline."""

from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from dro_plugins.cli.main import app


def test_tiny_model_folder_loads_and_generates(tmp_path):
    folder = tmp_path / "tiny"
    result = CliRunner().invoke(app, ["tiny-model", str(folder), "--seed", "3"])
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "which city?"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("assistant:")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert model.config.vocab_size == len(tokenizer)

    again = CliRunner().invoke(app, ["tiny-model", str(folder)])
    assert again.exit_code == 2 and "not empty" in again.output


def test_tiny_model_with_a_real_tokenizer(tmp_path, real_tokenizer_dirs):
    folder = tmp_path / "tiny-llama3"
    result = CliRunner().invoke(app, ["tiny-model", str(folder), "--tokenizer", str(real_tokenizer_dirs["llama3"])])
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.vocab_size == len(tokenizer) == 128256
    assert "<|start_header_id|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    missing = CliRunner().invoke(app, ["tiny-model", str(tmp_path / "other"), "--tokenizer", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "tokenizer folder" in missing.output and "Traceback" not in missing.output
