"""One place for tokenization: prompts encoded as serving encodes them, answers as the chat format writes them.

- **Prompts** (:func:`encode_prompt`): ``tokenizer(text)`` with the tokenizer's own special tokens, as the Hugging
  Face text-generation pipeline (Haystack's ``TransformersChatGenerator``) and LlamaIndex's ``HuggingFaceLLM`` do;
  when the text already starts with the BOS token (a chat template wrote it), none is added again.
- **Answer targets** (:class:`ChatFormat`): what the chat template writes for an assistant message, found by
  rendering a conversation with and without a probe answer and taking the difference (as chat-format trainers do):
  Llama 3 ends a turn with ``<|eot_id|>`` (not its eos ``<|end_of_text|>``), Qwen 3 writes an empty
  ``<think>`` block before the answer and ``<|im_end|>`` after it. Without a chat template: the answer, then eos.
- **Prompt and target together** (:func:`encode_with_target`): encoded once; the prompt's ids must be a prefix of the
  whole (byte-level BPE can merge across the join), else the target is encoded on its own, which is what a model
  continuing from the prompt's ids can write.
"""

from __future__ import annotations

from dataclasses import dataclass

from dro_plugins.errors import ModelLoadError

_PROBE_ANSWER = "Zanzibar 1878"


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids as serving encodes the text: the tokenizer's special tokens, but never a second BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def encode_like_transformers_pipeline(tokenizer):
    """The prompt encoder of serving paths that call ``tokenizer(text)`` on a rendered prompt: the transformers
    text-generation pipeline (Haystack's ``TransformersChatGenerator``) and LlamaIndex's ``HuggingFaceLLM``.

    They add the tokenizer's special tokens even when the chat template already wrote a BOS; training matches them.
    """
    return lambda text: tokenizer(text)["input_ids"]


def special_tokens(tokenizer) -> dict[str, int]:
    """Every special token of the tokenizer (named ones and added tokens marked special): text -> id."""
    found = dict(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids))
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            found[token.content] = token_id
    return found


@dataclass(frozen=True)
class ChatFormat:
    """What the chat format writes around an assistant's answer.

    Attributes:
        answer_prefix: text between the generation prompt and the answer ('' for most templates; Qwen 3 writes
            an empty think block).
        end_of_turn: text after the answer up to and including the first special token ('<|eot_id|>',
            '<|im_end|>'); the eos token without a chat template.
    """

    answer_prefix: str
    end_of_turn: str

    def target_text(self, answer: str) -> str:
        """The text the model is trained to write after the prompt: prefix, answer, end of turn."""
        return self.answer_prefix + answer + self.end_of_turn

    def strip(self, generated: str) -> str:
        """A decoded generation without the chat format's answer prefix, stripped."""
        text = generated.strip()
        prefix = self.answer_prefix.strip()
        return text[len(prefix) :].strip() if prefix and text.startswith(prefix) else text


def chat_format(tokenizer, field: str = "generator.model") -> ChatFormat:
    """The chat format of a tokenizer, from its chat template (see :class:`ChatFormat`).

    Raises:
        ModelLoadError: the chat template fails to render a plain user/assistant conversation, or there is neither a
            chat template nor an eos token to end an answer with.
    """
    eos = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        if eos is None:
            raise ModelLoadError(f"{field}: the tokenizer has no eos token and no chat template, so answers cannot end; add an eos_token")
        return ChatFormat("", eos)
    user = [{"role": "user", "content": "Which island?"}]
    try:
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": _PROBE_ANSWER}], tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a broken template (jinja error, missing variable) becomes one line
        raise ModelLoadError(
            f"{field}: the tokenizer's chat template fails on a user/assistant conversation ({type(exc).__name__}: {exc}); "
            "fix chat_template in tokenizer_config.json or remove it"
        ) from exc
    rest = full[len(prompt) :] if full.startswith(prompt) else ""
    if _PROBE_ANSWER not in rest:  # the template rewrites the conversation: fall back to answer + eos
        return ChatFormat("", eos or "")
    at = rest.index(_PROBE_ANSWER)
    suffix = rest[at + len(_PROBE_ANSWER) :]
    ends = [suffix.index(token) + len(token) for token in special_tokens(tokenizer) if token in suffix]
    return ChatFormat(rest[:at], suffix[: min(ends)] if ends else (eos or suffix))


def stop_token_ids(tokenizer, fmt: ChatFormat) -> list[int]:
    """Token ids that end a generated answer: the end of turn's special tokens, then the eos token."""
    special = set(special_tokens(tokenizer).values())
    ids = [i for i in tokenizer.encode(fmt.end_of_turn, add_special_tokens=False) if i in special]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def encode_with_target(encode, tokenizer, prompt_text: str, target_text: str) -> tuple[list[int], list[int]]:
    """Prompt ids and target ids, the pair encoded once.

    Args:
        encode: the prompt encoder (text -> ids) serving uses.
        prompt_text: the rendered prompt, up to where the answer starts.
        target_text: :meth:`ChatFormat.target_text` of the answer.

    Returns:
        ``(prompt_ids, target_ids)``: the whole's ids split after the prompt's, when the prompt's ids are a prefix of
        the whole; otherwise (BPE merged across the join) the target encoded on its own.
    """
    prompt = encode(prompt_text)
    whole = encode(prompt_text + target_text)
    if whole[: len(prompt)] == prompt:
        return prompt, whole[len(prompt) :]
    return prompt, tokenizer.encode(target_text, add_special_tokens=False)
