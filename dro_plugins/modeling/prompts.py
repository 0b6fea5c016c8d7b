"""Prompt text for the selector and the generator, rendered the same way in training and inference.

Both prompts are one user message. :func:`render` applies the tokenizer's chat template when it has one
(ending with the assistant turn's opening), otherwise it uses the plain text.
"""

from __future__ import annotations

from collections.abc import Sequence

from dro_plugins.data.examples import Passage


def _cut(text: str, max_words: int) -> str:
    words = text.split()
    return " ".join(words[:max_words])


def format_passage(label: str, passage: Passage, max_words: int) -> str:
    """One passage line: ``[label] title: text`` with the text cut to ``max_words`` words."""
    title = f"{passage.title}: " if passage.title else ""
    return f"[{label}] {title}{_cut(passage.text, max_words)}"


def selector_prompt(question: str, candidates: Sequence[Passage], top_k: int, max_words: int) -> str:
    """The selector's instruction: read the numbered candidates, write the top-k ids best first."""
    listing = "\n".join(format_passage(str(i + 1), p, max_words) for i, p in enumerate(candidates))
    return (
        f"Question: {question}\n\nCandidate passages:\n{listing}\n\n"
        f"Pick the {top_k} passages that best help answer the question, best first, "
        f"written like [3] > [1].\nQuestion: {question}"
    )


def generator_prompt(question: str, passages: Sequence[Passage], max_words: int) -> str:
    """The generator's instruction: answer the question from the selected passages, in their order."""
    listing = "\n".join(format_passage(str(i + 1), p, max_words) for i, p in enumerate(passages))
    return f"Answer the question with a short phrase, using the passages.\n\n{listing}\n\nQuestion: {question}"


def render(tokenizer, user_message: str) -> str:
    """The prompt text the model reads, up to where its answer starts.

    Uses ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` when the tokenizer has a
    chat template, so that fine-tuning and serving see the same text; otherwise the message plus a newline.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user_message}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return user_message + "\n"
