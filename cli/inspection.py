"""``dro inspect``: one question of a run, seen through every stage: candidates, samples, selection, answer."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

from dro_plugins.evaluation.attribution import failure_class
from dro_plugins.config import RunConfig
from dro_plugins.data.examples import Example, Passage, load_run_data
from dro_plugins.errors import DROError
from dro_plugins.data.labels import passage_has_answer
from dro_plugins.training.run_folder import RunPaths
from dro_plugins.training.estep import read_lines


def find_question(config: RunConfig, question_id: str) -> tuple[Example, str]:
    """The question with ``question_id`` in the run's training or validation file, and which file.

    Raises:
        DROError: no question has that id.
    """
    train, validation = load_run_data(config)
    for split, examples in (("train", train), ("validation", validation)):
        for example in examples:
            if example.id == question_id:
                return example, split
    raise DROError(
        f"question '{question_id}' is not among the run's {len(train)} training and {len(validation)} validation "
        f"questions ({config.data.train.name}, {config.data.validation.name}); ids look like '{train[0].id}'"
    )


def sampled_iterations(run_dir: Path) -> list[int]:
    stems = (p.stem.removeprefix("iteration_") for p in RunPaths(run_dir).samples.glob("iteration_*.jsonl"))
    return sorted(int(stem) for stem in stems if stem.isdigit())  # a stray file there is no iteration


def pick_iteration(run_dir: Path, iteration: int | None) -> int | None:
    """The E-step iteration to show: the one asked for, else the best iteration's, else the last one sampled.

    Raises:
        DROError: the run has no samples of the iteration asked for.
    """
    found = sampled_iterations(run_dir)
    if iteration is not None:
        if iteration not in found:
            have = ", ".join(map(str, found)) or "none yet"
            raise DROError(f"{run_dir}: no E-step samples of iteration {iteration} (iterations sampled: {have}); pass --iteration N")
        return iteration
    report = RunPaths(run_dir).report
    best = json.loads(report.read_text())["validation"]["iteration"] if report.is_file() else None
    return best if best in found else (found[-1] if found else None)


def samples_of(run_dir: Path, iteration: int, question_id: str) -> dict | None:
    """The question's line of an iteration's samples file (permutations, log-probs, log-likelihoods, weights)."""
    return next((line for line in read_lines(RunPaths(run_dir).samples_file(iteration)) if line["id"] == question_id), None)


def label(permutation: list[int]) -> str:
    return " > ".join(f"[{i + 1}]" for i in permutation)


def view(example: Example, split: str, iteration: int | None, samples: dict | None, selected: list[int], answer: str) -> Group:
    """The Rich view of one question: candidates, the iteration's samples by weight, the greedy selection and answer."""
    header = Text.assemble((f"{example.id}", "bold"), f" ({split}): {example.question}\ngold: {' | '.join(example.answers)}")
    parts = [header, _passages("candidates (answer: holds a gold answer)", example.candidates, example.answers, selected)]
    if samples is not None and "candidates" in samples:  # a trained retriever sampled from the pool it retrieved then
        pool = [Passage(**p) for p in samples["candidates"]]
        parts.append(_passages(f"the pool retrieved at E-step {iteration} (its samples' numbers)", pool, example.answers, []))
    if samples is None:
        reason = "validation questions are not sampled" if split == "validation" else "no E-step has run yet"
        parts.append(Text(f"no samples to show: {reason}"))
    else:
        table = Table(title=f"E-step samples of iteration {iteration}, by importance weight")
        for column in ("permutation", "selector log p", "generator log p(y)", "weight"):
            table.add_column(column, justify="right")
        rows = zip(samples["permutations"], samples["selector_log_probs"], samples["log_likelihoods"], samples["weights"])
        for permutation, log_prob, log_likelihood, weight in sorted(rows, key=lambda r: -r[3]):
            table.add_row(label(permutation), f"{log_prob:.3f}", f"{log_likelihood:.3f}", f"{weight:.3f}")
        parts += [table, Text(f"importance weights sum to {sum(samples['weights']):.3f}")]
    parts.append(Text(f"best iteration's greedy selection: {label(selected)} (* above)"))
    parts.append(Text(f"generator's answer: {answer or '(empty)'}  ->  {failure_class(example, selected, answer).replace('_', ' ')}"))
    return Group(*parts)


def _passages(title: str, passages, answers, selected: list[int]) -> Table:
    """Numbered passages (``*`` marks the selected ones), with whether each holds a gold answer."""
    table = Table(title=title)
    for column in ("#", "answer", "title", "text"):
        table.add_column(column, overflow="fold" if column == "text" else "ellipsis")
    for index, passage in enumerate(passages):
        holds = passage_has_answer(passage, answers)
        marker = "*" if index in selected else ""
        table.add_row(f"{index + 1}{marker}", "yes" if holds else "", passage.title[:30], " ".join(passage.text.split()[:14]))
    return table
