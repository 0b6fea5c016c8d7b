"""Every kind of bad input gets a one-line message that names the file, line or field and the fix."""

import json

import pytest

from dro_plugins.config import load_config
from dro_plugins.data.examples import load_examples
from dro_plugins.errors import ConfigError, DataError, ModelLoadError
from dro_plugins.modeling.loading import load_pretrained

GOOD = {"id": "q1", "question": "who?", "answers": ["ann"], "ctxs": [{"id": str(i), "title": "", "text": f"text {i}"} for i in range(3)]}


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found; point data\.train"):
        load_examples(tmp_path / "missing.jsonl", 20, 2)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON .*fix or remove the line"),
        (json.dumps(GOOD | {"answers": []}), r"bad\.jsonl:2: question 'q1' has no answers"),
        (json.dumps(GOOD | {"ctxs": []}), r"bad\.jsonl:2: question 'q1' has no candidates"),
        (json.dumps(GOOD | {"ctxs": GOOD["ctxs"][:1]}), r"bad\.jsonl:2: question 'q1' has 1 candidates but selector\.top_k is 2"),
        (json.dumps({"id": "x", "question": "q"}), r"bad\.jsonl:2: missing field 'answers'"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), line])
    with pytest.raises(DataError, match=message):
        load_examples(path, 20, 2)


def test_unknown_model_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"generator\.model: cannot load 'no-such-org/no-such-model'.*HF_HUB_OFFLINE"):
        load_pretrained("no-such-org/no-such-model", False, "generator.model")


def _config(write_config, **dro):
    return write_config(
        {
            "data": {"train": "t.jsonl", "validation": "v.jsonl", "num_candidates": 4},
            "selector": {"model": "tiny-llama", "top_k": 2},
            "generator": {"model": "tiny-llama"},
            "dro": dro,
        }
    )


def test_invalid_values_are_all_reported(write_config):
    path = _config(write_config, num_samples=0, temperature=-1)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "dro.num_samples: Input should be greater than or equal to 1 (got 0)" in text
    assert "dro.temperature: Input should be greater than 0 (got -1)" in text
    assert all(line.startswith(str(path)) for line in text.splitlines())


def test_top_k_larger_than_candidates(write_config):
    with pytest.raises(ConfigError, match=r"selector\.top_k \(9\) is larger than data\.num_candidates \(4\)"):
        load_config(_config(write_config), ["selector.top_k=9"])


def test_unknown_key_suggests_the_right_one(write_config):
    with pytest.raises(ConfigError, match=r"dro\.num_sample: unknown key; did you mean 'dro\.num_samples'\?"):
        load_config(_config(write_config, num_sample=4))


def test_bad_override_and_missing_config(write_config, tmp_path):
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        load_config(_config(write_config), ["dro.num_samples"])
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_relative_paths_resolve_against_the_config_file(write_config, tmp_path):
    config = load_config(_config(write_config))
    assert config.data.train == (tmp_path / "t.jsonl").resolve()
