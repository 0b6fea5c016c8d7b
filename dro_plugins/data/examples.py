"""Questions, answers and candidate passages, read from JSON lines in the ``../shared/data`` format."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from dro_plugins.config import MAX_QUESTION_CHARS, RunConfig
from dro_plugins.errors import DataError
from dro_plugins.files import why_not_a_file


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


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _text(raw: dict, field: str, where: str, default: str | None = None) -> str:
    """A string field; numbers are taken as their text, anything else is an error naming the field."""
    value = raw.get(field, default)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: '{field}' must be a string, got {_kind(value)}; fix the line or remove it")
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate such as "\ud800", which JSON escapes allow
        raise DataError(f"{where}: '{field}' holds invalid Unicode (a lone surrogate at character {exc.start + 1}); fix the line") from None
    return text


def _passage(raw: object, where: str) -> Passage:
    if not isinstance(raw, dict) or "text" not in raw:
        raise DataError(f"{where}: each passage needs at least a 'text' field")
    label = raw.get("has_answer", raw.get("is_gold"))
    if label is not None and not isinstance(label, (bool, int)):
        raise DataError(f"{where}: 'has_answer'/'is_gold' must be true or false, got {_kind(label)}")
    return Passage(
        id=_text(raw, "id", where, ""),
        title=_text(raw, "title", where, ""),
        text=_text(raw, "text", where),
        has_answer=None if label is None else bool(label),
    )


def parse_example(
    raw: object, where: str, num_candidates: int, top_k: int, with_candidates: bool = True, max_question_chars: int = MAX_QUESTION_CHARS
) -> Example:
    """Build an :class:`Example` from one decoded JSON line.

    Args:
        raw: the decoded line, ``{"id", "question", "answers", "ctxs"}``.
        where: ``file:line`` for error messages.
        num_candidates: keep the first this many candidates.
        top_k: the selector's k; a question needs at least this many candidates.
        with_candidates: False when a pipeline's retriever supplies the candidates: ``ctxs`` is then ignored
            and the example has none.
        max_question_chars: longest question accepted (``data.max_question_chars``).

    Raises:
        DataError: a field is missing, empty or too long, or there are fewer than ``top_k`` candidates.
    """
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object per line")
    needed = ("question", "answers", "ctxs") if with_candidates else ("question", "answers")
    for field in needed:
        if field not in raw:
            raise DataError(f"{where}: missing field '{field}'; each line needs {', '.join(needed)}")
    qid = _text(raw, "id", where, where)
    question = _text(raw, "question", where)
    if len(question) > max_question_chars:
        raise DataError(
            f"{where}: question '{qid[:80]}' is {len(question)} characters, over data.max_question_chars "
            f"({max_question_chars}); shorten it, remove the line, or raise the limit"
        )
    answers = raw["answers"]
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in answers):
        raise DataError(f"{where}: 'answers' must be a list of strings, got {_kind(answers)}; fix the line or remove it")
    answers = tuple(str(a) for a in answers if str(a).strip())
    if not answers:
        raise DataError(f"{where}: question '{qid}' has no answers; give at least one or remove the line")
    if not with_candidates:
        return Example(id=qid, question=question, answers=answers, candidates=())
    if not isinstance(raw["ctxs"], list):
        raise DataError(f"{where}: 'ctxs' must be a list of passages, got {_kind(raw['ctxs'])}; fix the line or remove it")
    candidates = tuple(_passage(c, where) for c in raw["ctxs"][:num_candidates])
    if not candidates:
        raise DataError(f"{where}: question '{qid}' has no candidates in 'ctxs'; add passages or remove the line")
    if len(candidates) < top_k:
        raise DataError(
            f"{where}: question '{qid}' has {len(candidates)} candidates but selector.top_k is {top_k}; "
            "lower selector.top_k or add candidates"
        )
    return Example(id=qid, question=question, answers=answers, candidates=candidates)


def _json_lines(path: Path, hint: str):
    """``(line number, decoded JSON)`` for each non-blank line of a UTF-8 JSON-lines file.

    Raises:
        DataError: the file is missing, a line is not UTF-8 or not JSON (the message names the line).
    """
    if not path.is_file():
        raise DataError(f"{path}: {why_not_a_file(path)}; {hint}")
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 text (byte {raw[exc.start]:#x} at column {exc.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                decoded = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); fix or remove the line") from None
            except RecursionError:
                raise DataError(f"{where}: JSON nested too deep to read; fix or remove the line") from None
            except ValueError as exc:  # e.g. an integer of more digits than Python converts
                raise DataError(f"{where}: unreadable JSON ({str(exc)[:120]}); fix or remove the line") from None
            yield number, decoded


def load_examples(
    path: str | Path,
    num_candidates: int,
    top_k: int,
    max_examples: int | None = None,
    with_candidates: bool = True,
    max_question_chars: int = MAX_QUESTION_CHARS,
) -> list[Example]:
    """Read a question file, one JSON object per line; blank lines are skipped.

    ``with_candidates=False`` reads questions and answers only (see :func:`parse_example`).

    Raises:
        DataError: the file is missing, a line is not JSON, a question is unusable, or two questions share an id
            (ids key the samples, attribution and inspect files); the message names the line.
    """
    path = Path(path)
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for number, raw in _json_lines(path, "point data.train/data.validation at a JSON-lines question file"):
        if max_examples is not None and len(examples) >= max_examples:
            break
        example = parse_example(raw, f"{path}:{number}", num_candidates, top_k, with_candidates, max_question_chars)
        if example.id in seen:
            raise DataError(
                f"{path}:{number}: question id '{example.id[:80]}' is also on line {seen[example.id]}; ids key the "
                "samples, attribution and inspect files, so make them unique"
            )
        seen[example.id] = number
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no questions found; the file is empty")
    return examples


def load_corpus(path: str | Path) -> list[Passage]:
    """Read a corpus file: one ``{"id", "title", "text"}`` JSON object per line (``../shared/data/nq/corpus.jsonl``).

    Raises:
        DataError: the file is missing or empty, or a line is not JSON or has no ``text`` (the message names the line).
    """
    path = Path(path)
    passages = []
    for number, raw in _json_lines(path, "point documents at a JSON-lines corpus of {id, title, text}"):
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
        load_examples(path, data.num_candidates, config.selector.top_k, data.max_examples, with_candidates, data.max_question_chars)
        for path in (data.train, data.validation)
    )
    return train, validation
