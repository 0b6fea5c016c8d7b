"""Property-based tests: loaders and serving components meet random input with a result or our one-line error.

The only outcomes allowed for the config loader (with ``--set`` overrides) and the question and corpus loaders are a
valid result or a :class:`dro_plugins.errors.DROError`; for the serving fallback, a list of indices, never an exception.
"""

import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dro_plugins.config import RunConfig, load_config
from dro_plugins.data.examples import Passage, load_corpus, load_examples
from dro_plugins.errors import DROError
from dro_plugins.serving import select_or_fallback

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
FIELDS = ["data", "selector", "generator", "warmup", "dro", "pipeline", "documents", "output_dir", "seed", "device"]
KEYS = ["data.train", "data.num_candidates", "selector.top_k", "selector.model", "selector.lora.rank", "dro.num_samples",
        "dro.temperature", "dro.max_tokens_per_microbatch", "generator.tiny.tokenizer", "device", "seed", "x.y", "data"]


def _valid_tree() -> dict:
    return {"data": {"train": "t.jsonl", "validation": "v.jsonl", "num_candidates": 4}, "selector": {"model": "tiny-llama", "top_k": 2},
            "generator": {"model": "tiny-llama"}}


@SETTINGS
@given(field=st.sampled_from(FIELDS), value=json_values, overrides=st.lists(st.tuples(st.sampled_from(KEYS), st.text(max_size=10)), max_size=3))
def test_config_loader(tmp_path, field, value, overrides):
    tree = _valid_tree() | {field: value}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    try:
        config = load_config(path, [f"{k}={v}" for k, v in overrides])
    except DROError as exc:
        assert str(exc) and "Traceback" not in str(exc)
        return
    assert isinstance(config, RunConfig)


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_config_loader_random_bytes(tmp_path, raw):
    path = tmp_path / "config.yaml"
    path.write_bytes(raw)
    try:
        load_config(path)
    except DROError:
        pass


GOOD = {"id": "q1", "question": "who?", "answers": ["ann"], "ctxs": [{"id": str(i), "title": "", "text": f"text {i}"} for i in range(3)]}


@SETTINGS
@given(field=st.sampled_from(["id", "question", "answers", "ctxs", "extra"]), value=json_values, passage_field=st.sampled_from(["id", "title", "text", "has_answer"]), passage_value=json_values)
def test_question_loader(tmp_path, field, value, passage_field, passage_value):
    line = dict(GOOD, **{field: value})
    second = dict(GOOD, ctxs=[dict(c, **{passage_field: passage_value}) for c in GOOD["ctxs"]])
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps(line) + "\n" + json.dumps(second) + "\n")
    try:
        examples = load_examples(path, 20, 2)
    except DROError:
        return
    assert all(isinstance(a, str) for ex in examples for a in ex.answers)
    assert all(isinstance(p.text, str) for ex in examples for p in ex.candidates)


@SETTINGS
@given(raw=st.binary(max_size=300))
def test_question_and_corpus_loaders_random_bytes(tmp_path, raw):
    path = tmp_path / "data.jsonl"
    path.write_bytes(raw)
    for load in (lambda: load_examples(path, 20, 2), lambda: load_corpus(path)):
        try:
            load()
        except DROError:
            pass


class _Selector:
    """A stand-in selector whose output is drawn by hypothesis: any list, or an exception."""

    def __init__(self, picks):
        self.picks = picks

    def select(self, batch, k):
        if isinstance(self.picks, Exception):
            raise self.picks
        return [self.picks]

    def write(self, batch, k, max_new_tokens):
        return [str(self.picks)]


@SETTINGS
@given(
    texts=st.lists(st.text(max_size=30), max_size=12),
    top_k=st.integers(1, 6),
    query=st.text(max_size=20),
    picks=st.one_of(st.lists(st.integers(0, 11), max_size=6), st.just(RuntimeError("boom"))),
    constrained=st.booleans(),
)
def test_serving_selection_never_raises(texts, top_k, query, picks, constrained):
    passages = [Passage(id=str(i), title="", text=t) for i, t in enumerate(texts)]
    indices, problem = select_or_fallback(_Selector(picks), query, passages, top_k, constrained)
    assert isinstance(indices, list) and len(indices) <= min(top_k, len(passages))
    if problem is not None:
        assert indices == list(range(min(top_k, len(passages))))


@pytest.mark.parametrize("documents", [[], ["only one"], ["", ""], ["same", "same", "same"], ["x " * 3000]])
def test_haystack_component_with_odd_document_lists(tiny_model_dir, documents):
    haystack = pytest.importorskip("haystack")
    from haystack_integrations.components.rankers.dro import DROSelector

    selector = DROSelector(model=str(tiny_model_dir), top_k=2, device="cpu", max_passage_words=20)
    docs = [haystack.Document(content=text) for text in documents] + [haystack.Document(content=None)] * (len(documents) == 2)
    out = selector.run(query="which?", documents=docs)["documents"]
    assert len(out) == min(2, len(docs)) and all(d in docs for d in out)
