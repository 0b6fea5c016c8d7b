"""Does DRO learn? The paper's ablations on tasks where tiny CPU models can learn, plus real data as it is.

Methods (all on the same task, seeds, warm-ups and number of M-step batches):

- ``dro``: the full method (E-step importance weights, Eq. 7; M-step Eq. 10 and 11);
- ``no_selector_training``: the selector stays at its warm-up state, the generator is trained with DRO
  (paper Table 4, "w/o selector");
- ``no_generator_training``: the generator stays at its warm-up state, the selector is trained ("w/o generator");
- ``unweighted``: every sample weighted 1/m (what the authors' released code amounts to);
- ``sft_first_k``: no selector; the generator is fine-tuned on the first-stage top-k (standard RAG fine-tuning);
- ``supervised_selector``: the LM selector trained on the labelled positives (an upper bound for what selection
  can learn from the labels), the generator frozen;
- ``retriever_dro``: DRO with the retriever selector (``selector.kind: retriever``: Plackett-Luce over
  all-MiniLM-L6-v2's scores; its query tower and temperature trained), the generator from the same warm-up;
- ``retriever_supervised``: the same retriever trained on the labelled positives (its upper bound).

The corpus task (``corpus_values``) asks each question about one passage of a shared corpus of 4,628 (values behind
three-word keys, 12 look-alike distractors per key, :func:`dro_plugins.data.synthetic.make_corpus_dataset`); every
pool is the top 8 that all-MiniLM-L6-v2 retrieves from it (the gold passage is in it for about 60% of the
questions), and an LM selector picks 2. Its methods:

- ``three_units``: DRO training the retriever's query tower (``retriever.train``), the LM selector and the generator,
  every pool re-retrieved each E-step; ``three_units_corpus_norm`` the same with L_R normalised over the corpus;
- ``lm_selector_only``: the same with the retriever frozen (``dro.train_retriever: false``: fixed pools);
- ``retriever_only``: DRO with the retriever as the selector (``selector.kind: retriever``, its top 2), no LM selector;
- ``supervised_selector`` and ``retriever_supervised`` as above: the supervised bounds.

Each (task, seed) warms up once (paper §6.4) and every method starts from that state, so iteration 0 is
the same for all methods that use the LM selector; the retriever methods start from the pretrained retriever and
the warmed-up generator. The supervised methods use the trainer's own optimizer step (``DROTrainer.step``) with
weight 1 on the supervised permutation, for the same number of batches as DRO's M-step. Prints a table; writes ``results.json`` and PNG plots to
``--out``. ``--quick`` is a few-minute version used by the test suite.

    python benchmarks/learning.py --out benchmarks/results/learning
    python benchmarks/learning.py --quick --out /tmp/learning-quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from dro_plugins.modeling.batching import Shape  # noqa: E402
from dro_plugins.config import RunConfig  # noqa: E402
from dro_plugins.data.examples import Example, Passage, load_examples  # noqa: E402
from dro_plugins.evaluation.predictions import batches, evaluate  # noqa: E402
from dro_plugins.reporting.plots import pyplot, save_figure  # noqa: E402
from dro_plugins.build import build_models, corpus_embeddings, load_model, load_retriever, load_retriever_selector, make_generator  # noqa: E402
from dro_plugins.config import MINILM  # noqa: E402
from dro_plugins.data.examples import load_corpus, write_examples  # noqa: E402
from dro_plugins.data.labels import passage_has_answer  # noqa: E402
from dro_plugins.data.synthetic import make_corpus_dataset, make_dataset, make_entity_dataset  # noqa: E402
from dro_plugins.modeling.loading import load_sentence_encoder  # noqa: E402
from dro_plugins.selectors.retriever import embed  # noqa: E402
from dro_plugins.training.run_folder import RunPaths  # noqa: E402
from dro_plugins.data.supervision import positive_candidates, supervised_permutation  # noqa: E402
from dro_plugins.training.trainer import DROTrainer  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
METHODS = ("dro", "no_selector_training", "no_generator_training", "unweighted", "sft_first_k")
SELECTION_METHODS = ("supervised_selector", "retriever_dro", "retriever_supervised")  # full runs only, by default
CORPUS_METHODS = ("three_units", "three_units_corpus_norm", "lm_selector_only", "retriever_only", "supervised_selector", "retriever_supervised")
METHOD_SETTINGS = {
    "dro": {},
    "no_selector_training": {"train_selector": False},
    "no_generator_training": {"train_generator": False},
    "unweighted": {"weighting": "uniform"},
    "supervised_selector": {"train_generator": False},
    "retriever_dro": {},
    "retriever_supervised": {"train_generator": False},
    "lm_selector_only": {"train_retriever": False},
}
RETRIEVER = {"kind": "retriever", "max_seq_length": 128}
METRICS = ("em", "f1", "recall", "pool_recall")
DIAGNOSTICS = ("ess", "weight_entropy", "distinct_samples", "sample_recall")
TINY_LORA = {"rank": 8, "alpha": 16, "modules_to_save": ["embed_tokens", "lm_head"]}


@dataclass(frozen=True)
class Task:
    """A benchmark task: how to make its questions, and the run settings that fit it.

    ``make(split, size, seed)`` returns ``size`` questions of ``split`` ("train" or "validation").
    ``sections`` are merged into the run config (warm-up, selector, generator and dro settings).
    """

    name: str
    make: Callable[[str, int, int], list[Example]]
    num_candidates: int
    top_k: int
    train_size: int
    validation_size: int
    sections: dict = field(default_factory=dict)
    seeds: int = 3
    sweep: tuple[int, ...] = ()
    corpus: bool = False  # the corpus task: pools re-retrieved from corpus_folder(seed) / "corpus.jsonl"


def shared_questions(split: str, size: int, _seed: int, name: str, num_candidates: int, top_k: int) -> list[Example]:
    """The first ``size`` questions of ``../shared/data/<name>/<split>.jsonl``, whatever the seed."""
    return load_examples(SHARED_DATA / name / f"{split}.jsonl", num_candidates, top_k, max_examples=size)


def synthetic_questions(split: str, size: int, seed: int, num_candidates: int, entity: bool = False) -> list[Example]:
    """Fresh synthetic questions (value task, or entity task); train and validation use different seeds."""
    seed = 2 * seed + (split == "validation")
    if entity:
        return make_entity_dataset(size, num_candidates, seed)
    return make_dataset(size, num_candidates, seed, passage_words=2)


CORPUS_ROOT = Path(tempfile.gettempdir()) / "dro-learning-corpus"
CORPUS_DISTRACTORS = 12


def corpus_folder(seed: int) -> Path:
    return CORPUS_ROOT / f"seed-{seed}"


def prepare_corpus_task(task: Task, seed: int) -> None:
    """Write the corpus task's corpus, its MiniLM embeddings (``index/``, as a run keeps them) and its questions
    with their starting pools (MiniLM's top ``task.num_candidates``, labelled by answer match) to
    :func:`corpus_folder`, once per seed."""
    folder = corpus_folder(seed)
    if (folder / "validation.jsonl").is_file():
        return
    questions, corpus = make_corpus_dataset(task.train_size + task.validation_size, CORPUS_DISTRACTORS, seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in corpus))
    encoder = load_sentence_encoder(MINILM, "retriever.model", "cpu", RETRIEVER["max_seq_length"])
    passages = load_corpus(folder / "corpus.jsonl")
    documents = corpus_embeddings(RunPaths(folder), encoder, passages)
    rows = (embed(encoder, [q.question for q in questions]) @ documents.T).topk(task.num_candidates).indices.tolist()
    pooled = [
        Example(q.id, q.question, q.answers, tuple(Passage(p.id, p.title, p.text, passage_has_answer(p, q.answers)) for p in (passages[i] for i in row)))
        for q, row in zip(questions, rows)
    ]
    write_examples(pooled[: task.train_size], folder / "train.jsonl")
    write_examples(pooled[task.train_size :], folder / "validation.jsonl")


def corpus_questions(split: str, size: int, seed: int) -> list[Example]:
    """The corpus task's questions of ``split`` with their starting pools (:func:`prepare_corpus_task`)."""
    return load_examples(corpus_folder(seed) / f"{split}.jsonl", 8, 2, max_examples=size)


def _synthetic_sections(iterations: int, num_samples: int, selector_warmup: int) -> dict:
    return {
        "warmup": {"generator_steps": 300, "selector_steps": selector_warmup, "learning_rate": 3e-3, "batch_size": 32},
        "dro": {"iterations": iterations, "num_samples": num_samples, "learning_rate": 3e-3, "batch_size": 16},
    }


def tasks(quick: bool) -> dict[str, Task]:
    """The tasks of a full or quick run, by name."""
    if quick:
        return {"synthetic_8": Task("synthetic_8", partial(synthetic_questions, num_candidates=8), 8, 2, 256, 100, _synthetic_sections(3, 16, 70), seeds=1)}
    real = {
        "selector": {"max_passage_words": 16},
        "generator": {"max_passage_words": 32, "max_new_tokens": 8},
        "warmup": {"generator_steps": 40, "selector_steps": 20, "learning_rate": 3e-3, "batch_size": 16},
        "dro": {"iterations": 3, "num_samples": 4, "learning_rate": 3e-3, "batch_size": 16},
    }
    # 20 candidates get fewer iterations: even supervised training needs more steps than this budget allows (README)
    listed = [
        Task("synthetic_8", partial(synthetic_questions, num_candidates=8), 8, 2, 256, 200, _synthetic_sections(6, 16, 70), sweep=(1, 2, 4, 8, 16)),
        Task("synthetic_20", partial(synthetic_questions, num_candidates=20), 20, 2, 256, 200, _synthetic_sections(3, 16, 70)),
        Task("entity_8", partial(synthetic_questions, num_candidates=8, entity=True), 8, 2, 256, 200, _synthetic_sections(5, 16, 70), seeds=1),
        Task("nq", partial(shared_questions, name="nq", num_candidates=10, top_k=3), 10, 3, 96, 64, real, seeds=1),
        Task("musique", partial(shared_questions, name="musique", num_candidates=10, top_k=3), 10, 3, 96, 64, real, seeds=1),
        Task("corpus_values", corpus_questions, 8, 2, 256, 100, _synthetic_sections(4, 8, 70), seeds=1, corpus=True),
    ]
    return {task.name: task for task in listed}


def chance_recall(examples: Sequence[Example], top_k: int) -> float:
    """Expected recall@k of a uniformly random k-subset: ``1 - C(n - h, k) / C(n, k)`` with h positives, averaged."""
    total = 0.0
    for example in examples:
        n = len(example.candidates)
        h = len(positive_candidates(example))
        total += 1 - math.comb(n - h, top_k) / math.comb(n, top_k)
    return total / len(examples)


def run_config(task: Task, seed: int, output_dir: Path, retriever: bool = False, method: str = "", **dro) -> RunConfig:
    """The run config of one method run: tiny models (or the retriever selector), the task's sections, ``dro``
    overrides, no early stopping; on the corpus task, the retriever re-retrieving from the corpus (as the selector,
    or as the third unit for ``three_units*`` and ``lm_selector_only``)."""
    tree = {
        "data": {"train": "unused", "validation": "unused", "num_candidates": task.num_candidates},
        "selector": {"model": "tiny-llama", "top_k": task.top_k, "lora": dict(TINY_LORA)},
        "generator": {"model": "tiny-llama", "max_new_tokens": 4, "lora": dict(TINY_LORA)},
        "output_dir": str(output_dir),
        "device": "cpu",
        "seed": seed,
        "eval_batch_size": 100,
    }
    for key, value in task.sections.items():
        tree.setdefault(key, {}).update(value)
    tree["dro"] = {**tree["dro"], **dro}
    tree["dro"]["patience"] = tree["dro"]["iterations"] + 1  # every method runs the whole budget
    corpus = {"corpus": str(corpus_folder(seed) / "corpus.jsonl")} if task.corpus else {}
    if retriever:
        tree["selector"] = {**RETRIEVER, "top_k": task.top_k, **corpus}
    if method.startswith("three_units") or method == "lm_selector_only":
        normalization = "corpus" if method.endswith("corpus_norm") else "pool"
        tree["retriever"] = {"train": True, "max_seq_length": RETRIEVER["max_seq_length"], "normalization": normalization, **corpus}
    return RunConfig.model_validate(tree)


class FirstStage:
    """The selector of ``sft_first_k``: the first k candidates in first-stage order."""

    def __init__(self, top_k: int):
        self.top_k = top_k

    def select(self, batch: Sequence[Example], k: int | None = None) -> list[list[int]]:
        return [list(range(k or self.top_k)) for _ in batch]

    def shape(self, example: Example, num_samples: int, top_k: int | None = None) -> Shape:
        return Shape(1, 1)  # no model, nothing to bound

    def candidates(self, batch: Sequence[Example]) -> list[Example]:
        return list(batch)  # the first-stage pool as it is


def sft_first_k(trainer: DROTrainer) -> list[dict]:
    """Fine-tune the generator on the first-stage top-k with the trainer's own M-step optimizer step.

    Same batch count, optimizer, micro-batching, clipping and NaN guard as DRO's generator update; only the
    permutation (candidates ``0..k-1``) and the weight (1) differ.

    Returns:
        the per-iteration history ``[{"iteration", "em", "f1", "recall"}]``, iteration 0 before training.
    """
    config, generator = trainer.config, trainer.generator
    dro, k = config.dro, config.selector.top_k
    first_stage = FirstStage(k)

    def validate(iteration: int) -> dict:
        result = evaluate(first_stage, generator, trainer.validation, config.eval_batch_size)
        return {"iteration": iteration, **{name: result[name] for name in METRICS}}

    history = [validate(0)]
    shuffle = torch.Generator().manual_seed(config.seed)
    for iteration in range(1, dro.iterations + 1):
        generator.model.train()
        for index in batches(torch.randperm(len(trainer.train_set), generator=shuffle).tolist(), dro.batch_size):
            batch = [trainer.train_set[i] for i in index]
            permutations = torch.arange(k).expand(len(batch), 1, k)
            trainer.step("generator", batch, permutations, torch.ones(len(batch), 1), trainer.optimizers["generator"])
        history.append(validate(iteration))
    return history


def supervised_selector(trainer: DROTrainer) -> list[dict]:
    """Train the selector on the labelled positives with the trainer's own M-step optimizer step (weight 1 on the
    supervised permutation: positives first), the generator frozen; the same batch count as DRO's M-step.

    Returns:
        the per-iteration history ``[{"iteration", "em", "f1", "recall"}]``, iteration 0 before training.
    """
    config = trainer.config
    k, labelled = config.selector.top_k, [ex for ex in trainer.train_set if positive_candidates(ex)]
    rng = random.Random(config.seed)

    def validate(iteration: int) -> dict:
        result = evaluate(trainer.selector, trainer.generator, trainer.validation, config.eval_batch_size)
        return {"iteration": iteration, **{name: result[name] for name in METRICS}}

    history = [validate(0)]
    for iteration in range(1, config.dro.iterations + 1):
        trainer.selector.model.train()
        for start in range(0, len(trainer.train_set), config.dro.batch_size):
            batch = rng.sample(labelled, min(config.dro.batch_size, len(labelled)))
            permutations = torch.tensor([supervised_permutation(ex, k, rng) for ex in batch])[:, None]
            trainer.step("selector", batch, permutations, torch.ones(len(batch), 1), trainer.optimizers["selector"])
        history.append(validate(iteration))
    return history


def _history(report: dict) -> list[dict]:
    keep = ("iteration",) + METRICS + DIAGNOSTICS
    return [{key: line[key] for key in keep if key in line} for line in report["history"] if line["stage"] == "dro"]


def _questions(task: Task, seed: int) -> tuple[list[Example], list[Example]]:
    return task.make("train", task.train_size, seed), task.make("validation", task.validation_size, seed)


def warm_up(task: Task, seed: int, folder: Path) -> dict:
    """The shared warm-up of (task, seed): adapters saved to ``folder/<role>``.

    Returns:
        ``{"before_warmup": {em, f1, recall}, "seconds": float}``.
    """
    torch.set_num_threads(1)
    train, validation = _questions(task, seed)
    config = run_config(task, seed, folder)
    selector, generator = build_models(config, folder)
    trainer = DROTrainer(config, selector, generator, train, validation, folder)
    before = evaluate(selector, generator, validation, config.eval_batch_size)
    started = time.perf_counter()
    trainer.warm_up()
    for role, unit in trainer.units.items():
        unit.save(folder / role)
    return {"before_warmup": {key: before[key] for key in METRICS}, "seconds": time.perf_counter() - started}


def run_method(task: Task, seed: int, method: str, num_samples: int, warm: Path, folder: Path) -> dict:
    """One method run from the warm-up in ``warm``, with ``num_samples`` (m) permutations per question.

    Returns:
        ``{"history": [{"iteration", "em", "f1", "recall", ...E-step diagnostics}], "seconds": float}``.
    """
    torch.set_num_threads(1)
    train, validation = _questions(task, seed)
    retriever = method.startswith("retriever")
    config = run_config(task, seed, folder, retriever, method, **METHOD_SETTINGS.get(method, {}), num_samples=num_samples)
    config.warmup.generator_steps = config.warmup.selector_steps = 0  # the shared warm-up replaces it
    if task.corpus:  # the corpus's embeddings, computed once by prepare_corpus_task
        shutil.copytree(corpus_folder(seed) / "index", folder / "index")
    if retriever:  # the pretrained retriever, and the warm-up's generator on the warm-up's (shared) tiny base
        shutil.copytree(warm / "base" / "selector", folder / "base" / "generator")
        selector = load_retriever_selector(config, folder)
        generator = make_generator(config, *load_model(config, "generator", folder, adapters=warm))
    else:  # the warm-up's adapters; a retriever unit starts from the pretrained retriever
        lm_only = config.model_copy(update={"retriever": config.retriever.model_copy(update={"train": False})})
        selector, generator = build_models(lm_only, warm, adapters=warm)
        if config.retriever.train:
            selector.retriever = load_retriever(config, "retriever", folder)
    started = time.perf_counter()
    trainer = DROTrainer(config, selector, generator, train, validation, folder)
    if method == "sft_first_k":
        history = sft_first_k(trainer)
    elif method.endswith("supervised") or method == "supervised_selector":
        history = supervised_selector(trainer)
    else:
        history = _history(trainer.fit())
    shutil.rmtree(folder, ignore_errors=True)  # samples and checkpoints are not needed afterwards
    return {"history": history, "seconds": time.perf_counter() - started}


# ---- aggregation, table, plots ------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def aggregate(histories: Sequence[list[dict]]) -> dict:
    """Mean ± std over seeds: final-iteration ``em``/``f1``/``recall`` (+ ``std``) and the per-iteration ``history``."""
    history = []
    for lines in zip(*histories):
        line = {"iteration": lines[0]["iteration"]}
        for key in METRICS + DIAGNOSTICS:
            if all(key in x for x in lines):
                line[key], line[f"{key}_std"] = _mean_std([x[key] for x in lines])
        history.append(line)
    final = history[-1]
    return {
        **{key: final[key] for key in METRICS},
        "std": {key: final[f"{key}_std"] for key in METRICS},
        "history": history,
        "seeds": list(histories),
    }


def summarize(task: Task, seeds: Sequence[int], warm_ups: dict, runs: dict) -> dict:
    """One task's entry of results.json, from the results of :func:`warm_up` and :func:`run_method`."""
    validation = task.make("validation", task.validation_size, seeds[0])
    chance = chance_recall(validation, task.top_k)
    main_m = task.sections["dro"]["num_samples"]
    found = sorted({(method, m) for (name, _seed, method, m) in runs if name == task.name})

    def histories(method: str, m: int) -> list[list[dict]]:
        return [runs[task.name, seed, method, m]["history"] for seed in seeds]

    after_warmup = [h[0]["recall"] for h in histories("dro", main_m)] if ("dro", main_m) in found else []
    return {
        "num_candidates": task.num_candidates,
        "top_k": task.top_k,
        "seeds": list(seeds),
        "chance_recall": chance,
        "before_warmup": {key: statistics.fmean(warm_ups[task.name, seed]["before_warmup"][key] for seed in seeds) for key in METRICS},
        # the warm-up rule: the selector's warm-up leaves recall at most 0.1 above chance
        "warmup_within_rule": [recall <= chance + 0.1 for recall in after_warmup],
        "methods": {method: aggregate(histories(method, m)) for method, m in found if m == main_m},
        "num_samples": {str(m): aggregate(histories(method, m)) for method, m in found if method == "dro" and m in task.sweep},
        "seconds": {
            "warm_up": sum(warm_ups[task.name, seed]["seconds"] for seed in seeds),
            **{f"{method}_m{m}": sum(runs[task.name, seed, method, m]["seconds"] for seed in seeds) for method, m in found},
        },
    }


def print_table(results: dict) -> None:
    """Final-iteration EM / F1 / recall per task and method (mean ± std over seeds), after-warm-up recall beside them."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="DRO learning benchmark: final iteration, mean ± std over seeds")
    for column in ("task", "seeds", "method", "EM", "F1", "recall", "pool recall", "recall it. 0", "chance"):
        table.add_column(column, justify="left" if column in ("task", "method") else "right", no_wrap=True)
    for name, task in results["tasks"].items():
        rows = [(method, entry) for method, entry in task["methods"].items()]
        main_m = results["settings"]["num_samples"][name]
        rows += [(f"dro m={m}", entry) for m, entry in task["num_samples"].items() if int(m) != main_m]
        for method, entry in rows:
            cells = [f"{entry[k]:.3f} ± {entry['std'][k]:.3f}" for k in METRICS]
            table.add_row(name, str(len(task["seeds"])), method, *cells, f"{entry['history'][0]['recall']:.3f}", f"{task['chance_recall']:.3f}")
        table.add_section()
    Console(width=160).print(table)


def _plot_lines(axis, entries: dict, key: str) -> None:
    for label, entry in entries.items():
        x = [line["iteration"] for line in entry["history"] if key in line]
        y = [line[key] for line in entry["history"] if key in line]
        std = [line[f"{key}_std"] for line in entry["history"] if key in line]
        if not x:
            continue
        axis.plot(x, y, marker="o", label=label)
        axis.fill_between(x, [a - b for a, b in zip(y, std)], [a + b for a, b in zip(y, std)], alpha=0.15)
    axis.set_xlabel("EM iteration")
    axis.set_ylabel(key)
    axis.grid(alpha=0.3)


def plot(results: dict, out: Path) -> list[Path]:
    """PNG files named after their content; returns their paths."""
    plt = pyplot()
    written = []

    def save(fig, name: str) -> None:
        written.append(save_figure(fig, out / name))

    for name, task in results["tasks"].items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for axis, key in zip(axes, ("f1", "recall")):
            _plot_lines(axis, task["methods"], key)
            axis.set_title(f"{name}: validation {key} by method")
        axes[0].legend(fontsize=8)
        save(fig, f"{name}_f1_recall_by_method.png")

        sampled = {m: e for m, e in task["methods"].items() if any("ess" in line for line in e["history"])}
        if sampled:
            fig, axes = plt.subplots(1, 2, figsize=(10, 4))
            for axis, key in zip(axes, ("ess", "weight_entropy")):
                _plot_lines(axis, sampled, key)
                axis.set_title(f"{name}: E-step {key.replace('_', ' ')} (m={results['settings']['num_samples'].get(name)})")
            axes[0].legend(fontsize=8)
            save(fig, f"{name}_ess_weight_entropy.png")

        if task["num_samples"]:
            fig, axis = plt.subplots(figsize=(5.5, 4))
            _plot_lines(axis, {f"m={m}": e for m, e in task["num_samples"].items()}, "f1")
            axis.set_title(f"{name}: dro validation F1 by samples per question m")
            axis.legend(fontsize=8)
            save(fig, f"{name}_f1_by_num_samples.png")
    return written


# ---- entry point --------------------------------------------------------------------------------


def task_methods(task: Task, named: Sequence[str] | None, quick: bool) -> list[str]:
    """The methods run on ``task``: those ``named`` that fit it (the corpus task has its own), else its defaults."""
    fitting = CORPUS_METHODS if task.corpus else METHODS + SELECTION_METHODS
    if named:
        return [method for method in named if method in fitting]
    return list(CORPUS_METHODS if task.corpus else METHODS if quick else METHODS + SELECTION_METHODS)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/learning"), help="output folder (created)")
    parser.add_argument("--quick", action="store_true", help="one task, one seed, 3 iterations: a few minutes")
    parser.add_argument("--tasks", nargs="*", help="run only these tasks (default: all of the mode)")
    parser.add_argument(
        "--methods", nargs="*", default=None, choices=tuple(dict.fromkeys(METHODS + SELECTION_METHODS + CORPUS_METHODS)),
        help="methods to compare (default: all; with --quick, the first five)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per task (default: the task's, 1 to 3)")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes, one CPU thread each")
    args = parser.parse_args(argv)

    available = tasks(args.quick)
    selected = [available[name] for name in (args.tasks or available)]
    for task in selected:
        for seed in range(args.seeds or task.seeds):
            if task.corpus:
                prepare_corpus_task(task, seed)
    task_seeds = {task.name: list(range(args.seeds or task.seeds)) for task in selected}
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs = {}  # (task, seed, method, m) -> result
    warm_ups = {}  # (task, seed) -> result
    with tempfile.TemporaryDirectory(prefix="dro-learning-") as workdir, ProcessPoolExecutor(args.workers) as pool:
        root = Path(workdir)
        pending = {
            pool.submit(warm_up, task, seed, root / f"{task.name}-{seed}" / "warm-up"): (task, seed)
            for task in selected
            for seed in task_seeds[task.name]
        }
        jobs = {}
        for done in as_completed(pending):
            task, seed = pending[done]
            warm_ups[task.name, seed] = done.result()
            folder = root / f"{task.name}-{seed}"
            main_m = task.sections["dro"]["num_samples"]
            variants = [(method, main_m) for method in task_methods(task, args.methods, args.quick)]
            variants += [("dro", m) for m in task.sweep if m != main_m]
            for method, m in variants:
                job = pool.submit(run_method, task, seed, method, m, folder / "warm-up", folder / f"{method}-m{m}")
                jobs[job] = (task.name, seed, method, m)
        for done in as_completed(jobs):
            runs[jobs[done]] = done.result()
            name, seed, method, m = jobs[done]
            print(f"{time.perf_counter() - started:6.0f}s  {name} seed {seed}: {method} m={m} done", file=sys.stderr, flush=True)
    results = {
        "settings": {
            "quick": args.quick,
            "seeds": task_seeds,
            "methods": {task.name: task_methods(task, args.methods, args.quick) for task in selected},
            "num_samples": {task.name: task.sections["dro"]["num_samples"] for task in selected},
            "iterations": {task.name: task.sections["dro"]["iterations"] for task in selected},
            "train_size": {task.name: task.train_size for task in selected},
            "validation_size": {task.name: task.validation_size for task in selected},
            "seconds": round(time.perf_counter() - started, 1),
        },
        "tasks": {task.name: summarize(task, task_seeds[task.name], warm_ups, runs) for task in selected},
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out)
    print_table(results)
    return results


if __name__ == "__main__":
    main()
