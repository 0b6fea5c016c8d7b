"""Questions, answers and candidate passages, read from JSON lines in the ``../shared/data`` format."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from dro_plugins.config import RunConfig
from dro_plugins.errors import DataError


@dataclass(frozen=True)
class Passage:
    """One candidate passage.

    ``has_answer`` is the data's relevance label: NQ's ``has_answer`` or MuSiQue's ``is_gold``
    (a supporting paragraph); ``None`` when the file has neither.
    """

    id: str
    title: str
    text: str
    has_answer: bool | None = None


@dataclass(frozen=True)
class Example:
    """A training or evaluation question with its gold answers and first-stage candidates, in order."""

    id: str
    question: str
    answers: tuple[str, ...]
    candidates: tuple[Passage, ...]

    @property
    def target(self) -> str:
        """The answer the generator is trained to produce: the first gold answer."""
        return self.answers[0]


def _passage(raw: dict, where: str) -> Passage:
    if not isinstance(raw, dict) or "text" not in raw:
        raise DataError(f"{where}: each passage needs at least a 'text' field")
    label = raw.get("has_answer", raw.get("is_gold"))
    return Passage(
        id=str(raw.get("id", "")),
        title=str(raw.get("title", "")),
        text=str(raw["text"]),
        has_answer=None if label is None else bool(label),
    )


def parse_example(raw: object, where: str, num_candidates: int, top_k: int, with_candidates: bool = True) -> Example:
    """Build an :class:`Example` from one decoded JSON line.

    Args:
        raw: the decoded line, ``{"id", "question", "answers", "ctxs"}``.
        where: ``file:line`` for error messages.
        num_candidates: keep the first this many candidates.
        top_k: the selector's k; a question needs at least this many candidates.
        with_candidates: False when a pipeline's retriever supplies the candidates: ``ctxs`` is then ignored
            and the example has none.

    Raises:
        DataError: a field is missing or empty, or there are fewer than ``top_k`` candidates.
    """
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object per line")
    needed = ("question", "answers", "ctxs") if with_candidates else ("question", "answers")
    for field in needed:
        if field not in raw:
            raise DataError(f"{where}: missing field '{field}'; each line needs {', '.join(needed)}")
    qid = str(raw.get("id", where))
    answers = raw["answers"]
    if isinstance(answers, str):
        answers = [answers]
    answers = tuple(str(a) for a in answers if str(a).strip())
    if not answers:
        raise DataError(f"{where}: question '{qid}' has no answers; give at least one or remove the line")
    if not with_candidates:
        return Example(id=qid, question=str(raw["question"]), answers=answers, candidates=())
    candidates = tuple(_passage(c, where) for c in raw["ctxs"][:num_candidates])
    if not candidates:
        raise DataError(f"{where}: question '{qid}' has no candidates in 'ctxs'; add passages or remove the line")
    if len(candidates) < top_k:
        raise DataError(
            f"{where}: question '{qid}' has {len(candidates)} candidates but selector.top_k is {top_k}; "
            "lower selector.top_k or add candidates"
        )
    return Example(id=qid, question=str(raw["question"]), answers=answers, candidates=candidates)


def load_examples(
    path: str | Path, num_candidates: int, top_k: int, max_examples: int | None = None, with_candidates: bool = True
) -> list[Example]:
    """Read a question file, one JSON object per line; blank lines are skipped.

    ``with_candidates=False`` reads questions and answers only (see :func:`parse_example`).

    Raises:
        DataError: the file is missing, a line is not JSON, or a question is unusable (the message names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; point data.train/data.validation at a JSON-lines question file")
    examples: list[Example] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if max_examples is not None and len(examples) >= max_examples:
                break
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); fix or remove the line")
            examples.append(parse_example(raw, where, num_candidates, top_k, with_candidates))
    if not examples:
        raise DataError(f"{path}: no questions found; the file is empty")
    return examples


def load_corpus(path: str | Path) -> list[Passage]:
    """Read a corpus file: one ``{"id", "title", "text"}`` JSON object per line (``../shared/data/nq/corpus.jsonl``).

    Raises:
        DataError: the file is missing or empty, or a line is not JSON or has no ``text`` (the message names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; point documents at a JSON-lines corpus of {{id, title, text}}")
    passages = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); fix or remove the line")
            passage = _passage(raw, f"{path}:{number}")
            passages.append(passage if passage.id else replace(passage, id=str(number)))
    if not passages:
        raise DataError(f"{path}: no passages found; the file is empty")
    return passages


def write_examples(examples: list[Example], path: str | Path) -> Path:
    """Write questions in the format :func:`load_examples` reads (``has_answer`` kept when known)."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as out:
        for ex in examples:
            ctxs = [
                {"id": p.id, "title": p.title, "text": p.text}
                | ({} if p.has_answer is None else {"has_answer": p.has_answer})
                for p in ex.candidates
            ]
            out.write(json.dumps({"id": ex.id, "question": ex.question, "answers": list(ex.answers), "ctxs": ctxs}) + "\n")
    return path


def load_run_data(config: RunConfig) -> tuple[list[Example], list[Example]]:
    """The training and validation questions a run config names (``data.*`` and ``selector.top_k``).

    With ``pipeline`` set the questions come without candidates: the pipeline's retriever supplies them.

    Raises:
        DataError: as :func:`load_examples`.
    """
    data = config.data
    with_candidates = config.pipeline is None
    train, validation = (
        load_examples(path, data.num_candidates, config.selector.top_k, data.max_examples, with_candidates)
        for path in (data.train, data.validation)
    )
    return train, validation
