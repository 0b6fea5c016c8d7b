"""LlamaIndex adapter: DROSelectorPostprocessor in real query engines, and `dro optimize` on a query-engine factory."""

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("llama_index.core")
pytest.importorskip("llama_index.llms.huggingface")

from llama_index.core import MockEmbedding, VectorStoreIndex  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode  # noqa: E402
from llama_index.llms.huggingface import HuggingFaceLLM  # noqa: E402
from llama_index.postprocessor.dro import DROSelectorPostprocessor  # noqa: E402
from llama_index.postprocessor.dro.postprocessor import node_to_passage  # noqa: E402

from dro_plugins.cli.main import app  # noqa: E402
from dro_plugins.data.examples import Example  # noqa: E402
from dro_plugins.serving import load_selector  # noqa: E402
from tests.conftest import REPO, SHARED_DATA  # noqa: E402

EXAMPLE = REPO / "examples" / "llama_index_nq"
NODES = [TextNode(id_=str(i), text=f"passage {i} about {w}", metadata={"title": w}) for i, w in enumerate("paris rome oslo lima bern kyiv".split())]


def tiny_llm(model_dir) -> HuggingFaceLLM:
    return HuggingFaceLLM(
        model_name=str(model_dir), tokenizer_name=str(model_dir), device_map="cpu", max_new_tokens=4,
        context_window=2048, generate_kwargs={"do_sample": False},
    )


def scored(nodes):
    return [NodeWithScore(node=n, score=1.0 - i / 10) for i, n in enumerate(nodes)]


def test_postprocessor_in_a_query_engine_returns_the_selectors_order(tiny_model_dir):
    index = VectorStoreIndex(NODES, embed_model=MockEmbedding(embed_dim=8))
    postprocessor = DROSelectorPostprocessor(model=str(tiny_model_dir), top_n=3, device="cpu")
    engine = index.as_query_engine(llm=tiny_llm(tiny_model_dir), similarity_top_k=6, node_postprocessors=[postprocessor])
    query = "which passage is about oslo?"
    retrieved = index.as_retriever(similarity_top_k=6).retrieve(query)
    expected = load_selector(str(tiny_model_dir), 3, "cpu").select(
        [Example(id="q", question=query, answers=("",), candidates=tuple(node_to_passage(n.node) for n in retrieved))], 3
    )[0]
    assert expected != [0, 1, 2]  # the random selector reorders, so returning the input order would fail

    response = engine.query(query)
    assert [n.node.node_id for n in response.source_nodes] == [retrieved[i].node.node_id for i in expected]
    assert [n.score for n in response.source_nodes] == [retrieved[i].score for i in expected]
    assert isinstance(response.response, str)


def test_rerank_events_and_the_async_path(tiny_model_dir):
    seen = []

    class Recorder(BaseEventHandler):
        def handle(self, event, **kwargs):
            seen.append(event)

    recorder = Recorder()
    root = get_dispatcher()
    root.add_event_handler(recorder)
    try:
        postprocessor = DROSelectorPostprocessor(model=str(tiny_model_dir), top_n=2, device="cpu")
        nodes = scored(NODES)
        selected = postprocessor.postprocess_nodes(nodes, query_str="rome?")
        concurrent = asyncio.run(postprocessor.apostprocess_nodes(nodes, query_str="rome?"))
    finally:
        root.event_handlers.remove(recorder)
    names = [type(e).__name__ for e in seen]
    assert names.count("ReRankStartEvent") == 2 and names.count("ReRankEndEvent") == 2
    start = next(e for e in seen if type(e).__name__ == "ReRankStartEvent")
    assert start.top_n == 2 and start.model_name == str(tiny_model_dir) and len(start.nodes) == 6
    assert [n.node.node_id for n in concurrent] == [n.node.node_id for n in selected] and len(selected) == 2


def test_unusable_output_falls_back_to_input_order_with_a_warning(tiny_model_dir, caplog):
    postprocessor = DROSelectorPostprocessor(model=str(tiny_model_dir), top_n=2, device="cpu", constrained=False, max_new_tokens=6)
    with caplog.at_level(logging.WARNING):
        out = postprocessor.postprocess_nodes(scored(NODES), QueryBundle("which city?"))
    assert [n.node.node_id for n in out] == ["0", "1"]
    assert "does not name 2 distinct candidates" in caplog.text


def test_class_name_and_to_dict_contract(tiny_model_dir):
    postprocessor = DROSelectorPostprocessor(model=str(tiny_model_dir), top_n=4, max_passage_words=30)
    data = postprocessor.to_dict()
    assert DROSelectorPostprocessor.class_name() == data["class_name"] == "DROSelectorPostprocessor"
    assert data["model"] == str(tiny_model_dir) and data["top_n"] == 4 and data["max_passage_words"] == 30
    assert DROSelectorPostprocessor.from_dict(data).to_dict() == data
    assert json.loads(postprocessor.to_json())["top_n"] == 4


def _write_factory(folder, body: str) -> str:
    (folder / "factory.py").write_text(body)
    return f"{folder / 'factory.py'}:build"


def _run_tree(factory: str, **extra):
    nq = SHARED_DATA / "nq"
    tree = {
        "pipeline": {"llama_index": factory},
        "data": {"train": str(nq / "train.jsonl"), "validation": str(nq / "validation.jsonl"), "max_examples": 8, "num_candidates": 4},
        "selector": {"model": "tiny-llama", "top_k": 2},
        "output_dir": "runs/test",
        "device": "cpu",
    }
    return tree | extra


@pytest.mark.parametrize("name", ["tiny", "llama3", "qwen3"])
def test_training_ids_are_the_ids_the_llm_reads(name, tiny_model_dir, real_tiny_model_dirs, tmp_path, write_config):
    """HuggingFaceLLM's model receives exactly the prompt ids DRO trains on, for the tiny and both real tokenizers."""
    from dro_plugins.config import load_config
    from dro_plugins.modeling.generator import LMGenerator
    from dro_plugins.modeling.loading import load_pretrained
    from llama_index.postprocessor.dro.engine import LlamaIndexPipeline

    model_dir = tiny_model_dir if name == "tiny" else real_tiny_model_dirs[name]
    factory = _write_factory(
        tmp_path,
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.test_llama_index import NODES, tiny_llm\n"
        "from llama_index.core import VectorStoreIndex\nfrom llama_index.core.embeddings import MockEmbedding\n"
        "def build():\n"
        "    index = VectorStoreIndex(NODES, embed_model=MockEmbedding(embed_dim=8))\n"
        f"    return index.as_query_engine(llm=tiny_llm({str(model_dir)!r}), similarity_top_k=3)\n",
    )
    pipeline = LlamaIndexPipeline(load_config(write_config(_run_tree(factory))))
    query = "which passage is about oslo?"
    passages = pipeline.retrieve(query, 3)
    model, tokenizer = load_pretrained(str(model_dir), False, "generator.model")
    trained = LMGenerator(model, tokenizer, 100, prompt=pipeline.prompt_renderer(tokenizer), encode=pipeline.prompt_encoder(tokenizer))
    training_ids = trained.prompt_ids(Example("q", query, ("oslo",), tuple(passages)), [0, 1, 2])

    seen, real_generate = [], pipeline.llm._model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return real_generate(*args, **kwargs)

    pipeline.llm._model.generate = spy
    pipeline.engine.query(query)
    assert seen == [training_ids]


@pytest.mark.parametrize(
    "body, message",
    [
        (None, r"pipeline\.llama_index: .*missing\.py not found"),
        ("def other():\n    pass\n", r"factory\.py has no function 'build'"),
        ("def build():\n    return 42\n", r"returned int, not a RetrieverQueryEngine"),
        (
            "from llama_index.core import MockEmbedding, VectorStoreIndex\nfrom llama_index.core.llms import MockLLM\n"
            "from llama_index.core.schema import TextNode\n"
            "def build():\n    index = VectorStoreIndex([TextNode(text='x')], embed_model=MockEmbedding(embed_dim=4))\n"
            "    return index.as_query_engine(llm=MockLLM())\n",
            r"the engine's LLM \(MockLLM\) is not a local HuggingFaceLLM.*swap it for HuggingFaceLLM.*train the selector alone",
        ),
        *(
            (
                "from llama_index.core import MockEmbedding, VectorStoreIndex\nfrom llama_index.core.llms import MockLLM\n"
                "from llama_index.core.schema import TextNode\n"
                "def build():\n    index = VectorStoreIndex([TextNode(text='x')], embed_model=MockEmbedding(embed_dim=4))\n"
                f"    return index.as_query_engine(llm=MockLLM(), response_mode={mode!r})\n",
                rf"response_mode '{mode}' calls the LLM more than once per query.*use response_mode='compact'",
            )
            for mode in ("refine", "tree_summarize", "accumulate")
        ),
        ("def build():\n    raise RuntimeError('index missing')\n", r"your factory `.*factory\.py:build` raised RuntimeError: index missing \(.*factory\.py:2\)"),
        ("def build(:\n", r"importing .*factory\.py failed: SyntaxError: .*\(.*factory\.py:1\)"),
        ("import no_such_package_xyz\n", r"importing .*factory\.py failed: ModuleNotFoundError: No module named 'no_such_package_xyz'"),
    ],
)
def test_unusable_factories_get_one_clear_line(tmp_path, write_config, body, message):
    factory = _write_factory(tmp_path, body) if body else f"{tmp_path / 'missing.py'}:build"
    result = CliRunner().invoke(app, ["validate", str(write_config(_run_tree(factory)))])
    assert result.exit_code == 2
    assert re.search(message, " ".join(result.output.split())), result.output


def test_the_fingerprint_names_the_engine_part_that_changed(tmp_path, tiny_model_dir, write_config):
    from dro_plugins.config import load_config
    from dro_plugins.pipeline import fingerprint
    from llama_index.postprocessor.dro.engine import LlamaIndexPipeline

    def parts(engine_options: str) -> dict:
        factory = _write_factory(
            tmp_path,
            "import sys\n"
            f"sys.path.insert(0, {str(REPO)!r})\n"
            "from tests.test_llama_index import NODES, tiny_llm\n"
            "from llama_index.core import PromptTemplate, VectorStoreIndex\nfrom llama_index.core.embeddings import MockEmbedding\n"
            "from llama_index.core.postprocessor import SimilarityPostprocessor\n"
            "def build():\n"
            "    index = VectorStoreIndex(NODES, embed_model=MockEmbedding(embed_dim=8))\n"
            f"    return index.as_query_engine(llm=tiny_llm({str(tiny_model_dir)!r}), {engine_options})\n",
        )
        config = load_config(write_config(_run_tree(factory)))
        pipeline = LlamaIndexPipeline(config)
        pipeline.retrieve("which passage is about oslo?", 4)  # sets similarity_top_k: the fingerprint is the factory's
        return fingerprint(config, pipeline)

    first = parts("similarity_top_k=3")
    assert set(first) == {"graph", "prompt template", "generator settings", "retrieval settings"} and parts("similarity_top_k=3") == first

    def changed(options: str) -> list[str]:
        return sorted(part for part, digest in parts(options).items() if first[part] != digest)

    assert changed("similarity_top_k=5") == ["retrieval settings"]
    assert changed("similarity_top_k=3, text_qa_template=PromptTemplate('{context_str} Q: {query_str} A:')") == ["prompt template"]
    assert changed("similarity_top_k=3, node_postprocessors=[SimilarityPostprocessor(similarity_cutoff=0.1)]") == ["graph"]


def test_the_engines_node_postprocessors_shape_the_candidates_as_serving_applies_them(tmp_path, tiny_model_dir, write_config):
    from dro_plugins.config import load_config
    from llama_index.postprocessor.dro.engine import LlamaIndexPipeline

    def factory(postprocessors: str) -> str:
        return _write_factory(
            tmp_path,
            "import sys\n"
            f"sys.path.insert(0, {str(REPO)!r})\n"
            "from tests.test_llama_index import NODES, tiny_llm\n"
            "from llama_index.core import VectorStoreIndex\nfrom llama_index.core.embeddings import MockEmbedding\n"
            "from llama_index.core.postprocessor import SimilarityPostprocessor\n"
            "from llama_index.core.postprocessor.types import BaseNodePostprocessor\n"
            "from llama_index.postprocessor.dro import DROSelectorPostprocessor\n"
            "class NoOslo(BaseNodePostprocessor):\n"
            "    def _postprocess_nodes(self, nodes, query_bundle=None):\n"
            "        return [n for n in nodes if 'oslo' not in n.node.get_content()]\n"
            "def build():\n"
            "    index = VectorStoreIndex(NODES, embed_model=MockEmbedding(embed_dim=8))\n"
            f"    return index.as_query_engine(llm=tiny_llm({str(tiny_model_dir)!r}), similarity_top_k=6, node_postprocessors={postprocessors})\n",
        )

    used = factory("[SimilarityPostprocessor(similarity_cutoff=0.0), NoOslo()]")
    pipeline = LlamaIndexPipeline(load_config(write_config(_run_tree(used))))
    candidates = pipeline.retrieve("which passage is about oslo?", 6)
    assert len(candidates) == 5 and not any("oslo" in p.text for p in candidates)  # the retriever alone returns all 6
    validated = CliRunner().invoke(app, ["validate", str(write_config(_run_tree(used)))])
    assert "node postprocessors SimilarityPostprocessor, NoOslo (applied to the candidates, before the DRO selector)" in " ".join(validated.output.split())

    refused = CliRunner().invoke(app, ["validate", str(write_config(_run_tree(used, selector={"kind": "retriever", "top_k": 2})))])
    assert refused.exit_code == 2 and "node postprocessors (SimilarityPostprocessor, NoOslo) change them first; use selector.kind lm" in " ".join(refused.output.split())
    longer = CliRunner().invoke(app, ["validate", str(write_config(_run_tree(used, generator={"max_new_tokens": 9})))])
    assert longer.exit_code == 2
    assert "generator.max_new_tokens is 9 but the pipeline's generator answers with max_new_tokens=4 when serving" in " ".join(longer.output.split())
    twice = factory(f"[DROSelectorPostprocessor(model={str(tiny_model_dir)!r})]")
    refused = CliRunner().invoke(app, ["validate", str(write_config(_run_tree(twice)))])
    assert refused.exit_code == 2 and "already has a DROSelectorPostprocessor" in " ".join(refused.output.split())


@pytest.mark.skipif(not (SHARED_DATA / "nq").is_dir(), reason="../shared/data is not beside the checkout")
def _example_factory(tmp_path, tiny_model_dir) -> str:
    """The example app's factory over a corpus slice (the candidates of the questions used: the MiniLM index
    builds in seconds), with the tiny generator."""
    nq = SHARED_DATA / "nq"
    passages = {}
    for name in ("train.jsonl", "validation.jsonl"):
        for line in (nq / name).read_text().splitlines()[:8]:
            for ctx in json.loads(line)["ctxs"]:
                passages[ctx["id"]] = {"id": ctx["id"], "title": ctx["title"], "text": ctx["text"]}
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in passages.values()))
    return _write_factory(
        tmp_path,
        f"import sys\nsys.path.insert(0, {str(EXAMPLE)!r})\nimport app\nfrom pathlib import Path\n"
        f"app.GENERATOR = Path({str(tiny_model_dir)!r})\n"
        f"def build(run_dir=None):\n"
        f"    return app.build_query_engine(run_dir, corpus=Path({str(corpus)!r}), storage=Path({str(tmp_path / 'storage')!r}))\n",
    )


def test_optimize_on_the_example_factory_and_serve_in_a_fresh_process(tmp_path, write_config, tiny_model_dir, monkeypatch, caplog):
    factory = _example_factory(tmp_path, tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    tree = _run_tree(factory, warmup={"generator_steps": 2, "selector_steps": 2}, dro={"iterations": 1, "num_samples": 2})
    tree["output_dir"] = str(tmp_path / "run")
    result = CliRunner().invoke(app, ["optimize", str(write_config(tree))])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "storage" / "docstore.json").is_file() and (tmp_path / "run" / "generator-model" / "config.json").is_file()
    assert f"fine-tuned generator model (serve it with your factory's run_dir, see the example app): {tmp_path / 'run'}" in " ".join(result.output.split())

    stored = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "storage").iterdir()}
    started = time.monotonic()
    validated = CliRunner().invoke(app, ["validate", str(write_config(tree))])
    assert validated.exit_code == 0, validated.output
    assert time.monotonic() - started < 60  # the stored index is loaded, not rebuilt (building embeds every passage)
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "storage").iterdir()} == stored
    assert "pipeline retriever (VectorIndexRetriever" in validated.output and "pipeline generator (HuggingFaceLLM)" in validated.output

    # served equals trained: the factory's engine for the run, queried by LlamaIndex, answers as dro evaluate does
    data = ["--data", str(SHARED_DATA / "nq" / "validation.jsonl"), "--max-examples", "4"]
    scored = CliRunner().invoke(app, ["evaluate", str(tmp_path / "run"), *data, "--trust-run-code"])
    assert scored.exit_code == 0, scored.output
    served = CliRunner().invoke(app, ["evaluate", str(tmp_path / "run"), *data, "--served", "--trust-run-code"])
    assert served.exit_code == 0, served.output
    ours = json.loads((tmp_path / "run" / "evaluation_validation.json").read_text())
    theirs = json.loads((tmp_path / "run" / "evaluation_served_validation.json").read_text())
    assert [p["prediction"] for p in theirs["optimized"]["predictions"]] == [p["prediction"] for p in ours["predictions"]]
    assert theirs["optimized"]["recall"] == ours["recall"]
    for side in ("original", "optimized"):  # LlamaIndex's retrieval metrics agree with ours where they measure the same thing
        assert theirs[side]["framework"]["llama_index hit rate"] == pytest.approx(theirs[side]["recall"])

    # more nodes than the selector was trained on (data.num_candidates = 4): one warning naming similarity_top_k
    postprocessor = DROSelectorPostprocessor.from_pretrained(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            postprocessor.postprocess_nodes([NodeWithScore(node=n, score=1.0) for n in NODES], query_bundle=QueryBundle("which city?"))
    warnings = [r.getMessage() for r in caplog.records if "was trained to choose from" in r.getMessage()]
    assert warnings == ["DROSelectorPostprocessor: got 6 candidates but was trained to choose from 4; set the retriever's "
                        "similarity_top_k to 4 so serving matches training"]

    script = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from factory import build\n"
        f"response = build(run_dir={str(tmp_path / 'run')!r}).query('who sang i will always love you')\n"
        "print(len(response.source_nodes)); print(type(response.response).__name__)"
    )
    served = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert served.returncode == 0, served.stderr[-2000:]
    assert served.stdout.split() == ["2", "str"]


def test_a_bm25_engine_from_args_trains_and_serves(tmp_path, write_config, tiny_model_dir, monkeypatch):
    """``RetrieverQueryEngine.from_args(BM25Retriever...)``, as the BM25 tutorial builds it, trains and serves."""
    pytest.importorskip("llama_index.retrievers.bm25")
    _example_factory(tmp_path, tiny_model_dir)  # writes the corpus slice
    factory = _write_factory(
        tmp_path,
        "import json, sys\nfrom pathlib import Path\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.test_llama_index import tiny_llm\n"
        "from llama_index.core.query_engine import RetrieverQueryEngine\nfrom llama_index.core.schema import TextNode\n"
        "from llama_index.postprocessor.dro import DROSelectorPostprocessor\nfrom llama_index.retrievers.bm25 import BM25Retriever\n"
        "def build(run_dir=None):\n"
        f"    lines = Path({str(tmp_path / 'corpus.jsonl')!r}).read_text().splitlines()\n"
        "    nodes = [TextNode(id_=p['id'], text=p['text'], metadata={'title': p['title']}) for p in map(json.loads, lines)]\n"
        "    retriever = BM25Retriever.from_defaults(nodes=nodes, similarity_top_k=4)\n"
        "    if run_dir is None:\n"
        f"        return RetrieverQueryEngine.from_args(retriever, llm=tiny_llm({str(tiny_model_dir)!r}))\n"
        "    return RetrieverQueryEngine.from_args(retriever, llm=tiny_llm(Path(run_dir) / 'generator-model'),\n"
        "                                          node_postprocessors=[DROSelectorPostprocessor.from_pretrained(run_dir)])\n",
    )
    monkeypatch.chdir(tmp_path)
    tree = _run_tree(factory, warmup={"generator_steps": 2, "selector_steps": 2}, dro={"iterations": 1, "num_samples": 2})
    tree["output_dir"] = str(tmp_path / "run")
    result = CliRunner().invoke(app, ["optimize", str(write_config(tree))])
    assert result.exit_code == 0, result.output
    validated = CliRunner().invoke(app, ["validate", str(write_config(tree))])
    assert "pipeline retriever (BM25Retriever, similarity_top_k=4)" in validated.output

    from llama_index.postprocessor.dro.engine import load_factory

    response = load_factory(factory)(run_dir=tmp_path / "run").query("who sang i will always love you")
    assert len(response.source_nodes) == 2 and isinstance(response.response, str)


def test_retriever_selector_trains_the_engines_embedding_model_and_the_factory_serves_it(tmp_path, write_config, tiny_model_dir, monkeypatch):
    factory = _example_factory(tmp_path, tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    tree = _run_tree(factory, warmup={"generator_steps": 2}, dro={"iterations": 1, "num_samples": 2, "batch_size": 4}, report_to="none")
    tree["selector"] = {"kind": "retriever", "top_k": 2, "max_seq_length": 64}
    tree["data"]["num_candidates"] = 5
    tree["output_dir"] = str(tmp_path / "run")
    validated = CliRunner().invoke(app, ["validate", str(write_config(tree))])
    assert validated.exit_code == 0, validated.output
    assert "pipeline query encoder model" in validated.output
    # the pools come with the vectors the index ranked them by: their similarities to the query are in order
    from llama_index.postprocessor.dro.engine import LlamaIndexPipeline

    from dro_plugins.config import load_config

    engine = LlamaIndexPipeline(load_config(write_config(tree)))
    query = torch.tensor([engine.retriever._embed_model.get_query_embedding("who sang i will always love you")])
    similarities = [float(torch.tensor(vector) @ query[0]) for _, vector in engine.search(query, 5)[0]]
    assert len(similarities) == 5 and all(a >= b - 1e-5 for a, b in zip(similarities, similarities[1:]))
    result = CliRunner().invoke(app, ["optimize", str(write_config(tree))])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    samples = [json.loads(line) for line in (run / "samples" / "iteration_001.jsonl").read_text().splitlines()]
    assert all(len(line["candidates"]) == 5 for line in samples)  # re-retrieved from the engine's index

    script = (
        f"import sys, torch; sys.path.insert(0, {str(tmp_path)!r}); from factory import build\n"
        "from sentence_transformers import SentenceTransformer\n"
        f"engine = build(run_dir={str(run)!r}); question = 'who sang i will always love you'\n"
        "served = torch.tensor(engine.retriever._embed_model.get_query_embedding(question))\n"
        f"trained = SentenceTransformer({str(run / 'selector')!r}, device='cpu').encode(question, convert_to_tensor=True)\n"
        "original = torch.tensor(build().retriever._embed_model.get_query_embedding(question))\n"
        "print(len(engine.query(question).source_nodes), (served - trained).abs().max().item(), (served - original).abs().max().item())"
    )
    served = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert served.returncode == 0, served.stderr[-2000:]
    count, to_trained, to_original = served.stdout.split()[-3:]
    assert int(count) == 2 and float(to_trained) < 1e-5 and float(to_original) > 1e-4


def test_three_units_train_and_the_factory_serves_the_query_model_the_selector_and_the_generator(tmp_path, write_config, tiny_model_dir, monkeypatch):
    """retriever.train: the engine's HuggingFaceEmbedding, an LM selector over its top n and the LLM are trained in one
    run; the example factory serves all three from the run folder (the fine-tuned query model retrieves, the DRO
    postprocessor picks, the fine-tuned generator answers)."""
    factory = _example_factory(tmp_path, tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    tree = _run_tree(factory, warmup={"generator_steps": 2, "selector_steps": 2}, dro={"iterations": 1, "num_samples": 2, "batch_size": 4}, report_to="none")
    tree["retriever"] = {"train": True, "max_seq_length": 64}
    tree["data"]["num_candidates"] = 5
    tree["output_dir"] = str(tmp_path / "run")
    result = CliRunner().invoke(app, ["optimize", str(write_config(tree))])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    samples = [json.loads(line) for line in (run / "samples" / "iteration_001.jsonl").read_text().splitlines()]
    assert all(len(line["candidates"]) == 5 for line in samples)  # re-retrieved from the engine's index
    assert all((run / role).is_dir() for role in ("retriever", "selector", "generator-model"))

    script = (
        f"import sys, torch; sys.path.insert(0, {str(tmp_path)!r}); from factory import build\n"
        "from sentence_transformers import SentenceTransformer\n"
        f"engine = build(run_dir={str(run)!r}); question = 'who sang i will always love you'\n"
        "served = torch.tensor(engine.retriever._embed_model.get_query_embedding(question))\n"
        f"trained = SentenceTransformer({str(run / 'retriever')!r}, device='cpu').encode(question, convert_to_tensor=True)\n"
        "print(len(engine.query(question).source_nodes), engine.retriever.similarity_top_k, "
        "[type(p).__name__ for p in engine._node_postprocessors], (served - trained).abs().max().item())"
    )
    served = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert served.returncode == 0, served.stderr[-2000:]
    count, top_n, postprocessors, gap = served.stdout.split(maxsplit=3)[0], *served.stdout.rsplit(maxsplit=3)[-3:]
    assert (int(count), int(top_n), postprocessors) == (2, 5, "['DROSelectorPostprocessor']") and float(gap) < 1e-5


def test_example_app_without_its_generator_says_what_to_run(tmp_path):
    sys.path.insert(0, str(EXAMPLE))
    try:
        import app as example_app
    finally:
        sys.path.remove(str(EXAMPLE))
    with pytest.raises(FileNotFoundError, match="run `dro optimize config.yaml` first"):
        example_app.build_query_engine(run_dir=tmp_path / "no-run")
