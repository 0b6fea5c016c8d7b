"""Real tokenizers (Llama 3, Qwen 3) and the tiny WordPiece one: canonical selector outputs, chat-format answer
targets, prompt ids as serving encodes them."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dro_plugins.data.examples import Example, Passage
from dro_plugins.modeling.generator import LMGenerator
from dro_plugins.modeling.loading import add_lora, load_pretrained
from dro_plugins.modeling.permutation import PermutationGrammar, permutation_text
from dro_plugins.modeling.prompts import render, selector_prompt
from dro_plugins.selectors.lm import LMSelector
from dro_plugins.modeling.tokenization import chat_format
from tests.conftest import REAL_TOKENIZERS

ALL = ("tiny",) + REAL_TOKENIZERS


@pytest.fixture(scope="module")
def tokenizers(real_tokenizer_dirs, tiny_model_dir):
    found = {name: load_pretrained(str(folder), False, "model")[1] for name, folder in {"tiny": tiny_model_dir}.items()}
    for name, folder in real_tokenizer_dirs.items():
        found[name] = AutoTokenizer.from_pretrained(folder)
    return found


def _encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("name", ALL)
def test_grammar_is_canonical_for_sampled_permutations_and_every_label_in_every_slot(tokenizers, name):
    tokenizer = tokenizers[name]
    grammar = PermutationGrammar(tokenizer, 20, 5)
    rng = random.Random(0)
    for _ in range(1000):
        permutation = rng.sample(range(20), 5)
        assert grammar.encode(permutation) == _encode(tokenizer, permutation_text(permutation)), permutation
    for slot in range(5):
        for label in range(20):
            others = [i for i in range(20) if i != label][:4]
            permutation = others[:slot] + [label] + others[slot:]
            assert grammar.encode(permutation) == _encode(tokenizer, permutation_text(permutation))


def test_byte_level_bpe_writes_the_separator_with_the_bracket(tokenizers):
    """The split the old grammar got wrong: ' >', ' [' in Llama 3 and Qwen 3, digits one by one in Qwen 3."""
    for name in REAL_TOKENIZERS:
        tokenizer = tokenizers[name]
        pieces = [tokenizer.decode([i]) for i in PermutationGrammar(tokenizer, 20, 2).encode([6, 14])]
        assert pieces[3:5] == [" >", " ["], pieces
    qwen = [tokenizers["qwen3"].decode([i]) for i in PermutationGrammar(tokenizers["qwen3"], 20, 2).encode([6, 14])]
    assert qwen[-3:] == ["1", "5", "]"]


def _questions(n=20):
    words = "red blue green small quiet old new far near tall short wide deep high low dark light warm cold soft".split()
    return [
        Example("a", "which colour is the sky?", ("blue",), tuple(Passage(str(i), f"t{i}", f"{w} stone") for i, w in enumerate(words[:n]))),
        Example("b", "where is the mill?", ("old mill",), tuple(Passage(str(i), "", f"the {w} mill") for i, w in enumerate(words[:n]))),
    ]


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_selector_outputs_in_context_and_sampled_log_probs_equal_log_prob(real_tiny_model_dirs, name):
    model, tokenizer = load_pretrained(str(real_tiny_model_dirs[name]), False, "selector.model")
    selector = LMSelector(add_lora(model, _lora()), tokenizer, top_k=5, max_passage_words=6)
    questions = _questions()
    drawn = selector.sample(questions, 8, 1.0, rng=3)
    with torch.no_grad():
        rescored = selector.log_prob(questions, drawn.permutations)
    assert torch.allclose(rescored, drawn.log_probs, atol=1e-5)
    # the prompt's ids followed by a permutation's ids are the tokenizer's encoding of the two texts together
    example, permutation = questions[0], drawn.permutations[0, 0].tolist()
    text = render(tokenizer, selector_prompt(example.question, example.candidates, 5, 6))
    grammar = selector.grammar(20, 5)
    assert selector.prompt_ids(example, 5) + grammar.encode(permutation) == tokenizer(text + permutation_text(permutation))["input_ids"]


def _lora():
    from dro_plugins.config import LoraConfig

    return LoraConfig(rank=4, alpha=8)


def test_answer_ends_as_the_chat_format_ends_a_turn(tokenizers):
    expected = {"tiny": "[SEP]", "llama3": "<|eot_id|>", "qwen3": "<|im_end|>"}
    for name, tokenizer in tokenizers.items():
        fmt = chat_format(tokenizer)
        assert fmt.end_of_turn.strip() == expected[name]
    llama = tokenizers["llama3"]
    assert llama.eos_token == "<|end_of_text|>" and chat_format(llama).end_of_turn != llama.eos_token
    assert chat_format(tokenizers["qwen3"]).answer_prefix == "<think>\n\n</think>\n\n"


@pytest.mark.parametrize("name", ALL)
def test_generator_trains_the_tokens_of_the_rendered_conversation(real_tiny_model_dirs, tiny_model_dir, name):
    folder = tiny_model_dir if name == "tiny" else real_tiny_model_dirs[name]
    model, tokenizer = load_pretrained(str(folder), False, "generator.model")
    generator = LMGenerator(add_lora(model, _lora()), tokenizer, max_passage_words=6, max_new_tokens=4)
    example = _questions(5)[1]
    prompt, target = generator.sequence(example, [2, 0, 1])
    assert generator.prompt_text(example, [2, 0, 1]) == render(tokenizer, _user_message(example, [2, 0, 1]))
    conversation = [{"role": "user", "content": _user_message(example, [2, 0, 1])}, {"role": "assistant", "content": "old mill"}]
    whole = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False))["input_ids"]
    assert whole[: len(prompt + target)] == prompt + target  # the rendered conversation, up to the end of the turn
    assert target == generator.answer_ids("old mill")
    assert target[-1] in generator.stop_ids
    assert tokenizer.decode(target).endswith(chat_format(tokenizer).end_of_turn.strip())


def _user_message(example, permutation):
    from dro_plugins.modeling.prompts import generator_prompt

    return generator_prompt(example.question, [example.candidates[i] for i in permutation], 6)


def test_generation_stops_at_the_end_of_turn_and_drops_the_answer_prefix(real_tiny_model_dirs):
    model, tokenizer = load_pretrained(str(real_tiny_model_dirs["qwen3"]), False, "generator.model")
    generator = LMGenerator(add_lora(model, _lora()), tokenizer, max_passage_words=6, max_new_tokens=6)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    think = tokenizer.encode("<think>\n\n</think>\n\nmill", add_special_tokens=False)
    scripted = think + [end] + tokenizer.encode(" never", add_special_tokens=False)

    def generate(input_ids, eos_token_id, **_):
        assert end in eos_token_id
        steps = scripted[: scripted.index(end) + 1]  # a model stops at its eos
        return torch.cat([input_ids, torch.tensor([steps] * input_ids.shape[0])], 1)

    generator.model.generate = generate
    assert generator.generate(_questions(5)[:1], [[0, 1, 2]]) == ["mill"]


def test_tokenizers_without_pad_or_bos_load(real_tiny_model_dirs):
    llama = AutoModelForCausalLM.from_pretrained(real_tiny_model_dirs["llama3"])
    _, tokenizer = load_pretrained(str(real_tiny_model_dirs["llama3"]), False, "generator.model")
    assert tokenizer.pad_token is not None and llama.config.vocab_size == len(tokenizer)
    _, qwen = load_pretrained(str(real_tiny_model_dirs["qwen3"]), False, "generator.model")
    assert qwen.bos_token is None and qwen.pad_token == "<|endoftext|>"


def test_a_chat_template_that_raises_is_one_line_naming_the_field(tiny_model_dir):
    from dro_plugins.errors import ModelLoadError

    model, tokenizer = load_pretrained(str(tiny_model_dir), False, "generator.model")
    tokenizer.chat_template = "{{ raise_exception('no assistant turns here') }}"
    with pytest.raises(ModelLoadError, match=r"generator\.model: the tokenizer's chat template fails .*no assistant turns here"):
        LMGenerator(model, tokenizer, max_passage_words=6)
