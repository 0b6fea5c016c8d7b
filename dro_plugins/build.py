"""The models of a run: built fresh from a config (:func:`build_models`), loaded from a run folder
(:func:`load_trained`), and the generator exported as a plain Hugging Face folder (:func:`export_generator`).

Where each file of a run folder lives: :class:`dro_plugins.training.run_folder.RunPaths`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from dro_plugins.config import RunConfig, load_config
from dro_plugins.data.examples import load_corpus
from dro_plugins.errors import DROError
from dro_plugins.files import atomic_write_bytes
from dro_plugins.modeling.generator import LMGenerator
from dro_plugins.modeling.loading import add_lora, enable_gradient_checkpointing, load_base_model, load_lora, load_sentence_encoder
from dro_plugins.distributed.device import gradient_checkpointing_default, resolve_device
from dro_plugins.selectors.index import FaissIndex
from dro_plugins.selectors.lm import LMSelector
from dro_plugins.selectors.retriever import BiEncoderScorer, RetrieverSelector, embed, passage_text
from dro_plugins.modeling.units import AdapterUnit
from dro_plugins.training.run_folder import RunPaths


ROLES = ("selector", "generator")


def shares_base(config: RunConfig, run_dir: Path) -> bool:
    """Whether the selector and the generator use one base model (loaded once, with two adapters).

    True when both name the same model with the same loading settings. A run written before bases were shared
    keeps its two tiny bases (``base/generator`` exists) and is loaded as it was trained.
    """
    selector, generator = config.selector, config.generator
    if selector.kind != "lm":
        return False
    same = (selector.model, selector.trust_remote_code, selector.tiny) == (generator.model, generator.trust_remote_code, generator.tiny)
    return same and not (RunPaths(Path(run_dir)).tiny_base("generator") / "config.json").is_file()


def _load_base(config: RunConfig, role: str, run_dir: Path, load_device: str | None = None):
    """``role``'s base model and tokenizer; a shared base is the selector's (its tiny folder and seed)."""
    owner = "selector" if shares_base(config, run_dir) else role
    device, dtype = resolve_device(config.device)
    device = torch.device(load_device) if load_device else device
    seed = config.seed + ROLES.index(owner)
    return load_base_model(getattr(config, owner), f"{role}.model", RunPaths(run_dir).tiny_base(owner), seed, device, dtype)


def _with_adapter(config: RunConfig, role: str, model, adapters: Path | None, trainable: bool):
    """``model`` with ``role``'s adapter: fresh (seeded) when ``adapters`` is None, else loaded from ``adapters/role``."""
    if adapters is None:
        torch.manual_seed(config.seed + ROLES.index(role))  # LoRA's initialisation draws from the global RNG
        return add_lora(model, getattr(config, role).lora, name=role, field=f"{role}.lora")
    return load_lora(model, Path(adapters) / role, name=role, trainable=trainable)


def load_model(
    config: RunConfig, role: str, run_dir: Path, adapters: Path | None = None, trainable: bool = True, load_device: str | None = None
):
    """One role's base model with its LoRA adapter (named after the role), on the config's device.

    Args:
        config: the run config.
        role: "selector" or "generator".
        run_dir: run folder (tiny base models are written to and read from it).
        adapters: a folder holding ``<role>/`` LoRA adapters to load; fresh adapters when None.
        trainable: whether loaded adapters are trainable.
        load_device: where the weights are read to, when not the config's device (``Runtime.load_device``: FSDP2
            moves each process's shard from there to its GPU); the compute dtype is still the config device's.

    Returns:
        ``(AdapterUnit, tokenizer)``.

    Raises:
        ModelLoadError: the base model cannot be loaded.
    """
    base, tokenizer = _load_base(config, role, Path(run_dir), load_device)
    model = _with_adapter(config, role, base, adapters, trainable)
    _set_checkpointing(config, model, [role])
    return AdapterUnit(model, role, trainable), tokenizer


def _set_checkpointing(config: RunConfig, model, roles: list[str]) -> None:
    device, _ = resolve_device(config.device)
    wanted = [getattr(config, role).gradient_checkpointing for role in roles]
    if any(gradient_checkpointing_default(device) if w is None else w for w in wanted):
        enable_gradient_checkpointing(model)


def load_retriever(
    config: RunConfig, role: str, run_dir: Path, adapters: Path | None = None, index=None
) -> RetrieverSelector:
    """A bi-encoder retriever from the config section of ``role``: ``selector`` (``selector.kind: retriever``) or
    ``retriever`` (the third unit in front of an LM selector, ``retriever.train``). Its query tower is
    ``adapters/<role>`` when given, else ``<role>.model``; the frozen document tower is ``<role>.document_model``
    (else ``<role>.model``); and tau.

    Args:
        index: where pools are re-retrieved from; None builds a :class:`FaissIndex` over ``<role>.corpus`` when it
            is set (its embeddings kept in ``run_dir/index``), and keeps the questions' own pools otherwise.

    Raises:
        ModelLoadError: a model cannot be loaded. DataError: the corpus cannot be read.
    """
    section = getattr(config, role)
    device, _ = resolve_device(config.device)
    query = load_sentence_encoder(section.model, f"{role}.model", device, section.max_seq_length)
    documents = load_sentence_encoder(section.document_model or section.model, f"{role}.document_model", device, section.max_seq_length)
    scorer = BiEncoderScorer(query, section.temperature, section.train_temperature, section.temperature_learning_rate)
    selector = RetrieverSelector(
        scorer, documents, config.selector.top_k, num_candidates=config.data.num_candidates,
        query_prefix=section.query_prefix, query_suffix=section.query_suffix,
    )
    if adapters is not None:
        selector.unit.load(RunPaths(Path(adapters)).adapter(role))
    if index is None and section.corpus is not None:
        passages = load_corpus(section.corpus)
        embeddings = corpus_embeddings(RunPaths(Path(run_dir)), documents, passages)
        index = FaissIndex(passages, embeddings)
        selector.remember(passages, embeddings)
        if getattr(section, "normalization", "pool") == "corpus":
            selector.corpus_embeddings = torch.nn.functional.normalize(embeddings.float(), dim=-1).to(device)
    selector.index = index
    return selector


def load_retriever_selector(config: RunConfig, run_dir: Path, adapters: Path | None = None, index=None) -> RetrieverSelector:
    """The retriever selector (``selector.kind: retriever``): :func:`load_retriever` for the selector role."""
    return load_retriever(config, "selector", run_dir, adapters, index)


def corpus_embeddings(paths: RunPaths, encoder, passages) -> torch.Tensor:
    """The document tower's embeddings ``[N, d]`` of ``passages``, computed once and kept in ``index/`` (keyed by
    a hash of the texts and the tower's weights' shapes, so a changed corpus is re-embedded)."""
    digest = hashlib.sha256("\n".join(passage_text(p) for p in passages).encode()).hexdigest()[:16]
    file = paths.index / f"embeddings-{digest}.safetensors"
    if file.is_file():
        return load_file(file)["embeddings"]
    embeddings = embed(encoder, [passage_text(p) for p in passages]).cpu()
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(file, save({"embeddings": embeddings.contiguous()}))
    return embeddings


def make_selector(config: RunConfig, unit: AdapterUnit, tokenizer, retriever: RetrieverSelector | None = None) -> LMSelector:
    """An :class:`LMSelector` with the config's k and passage length, ranking ``retriever``'s pools when given."""
    return LMSelector(
        unit.model, tokenizer, top_k=config.selector.top_k, max_passage_words=config.selector.max_passage_words, unit=unit,
        retriever=retriever,
    )


def make_generator(config: RunConfig, unit: AdapterUnit, tokenizer) -> LMGenerator:
    """An :class:`LMGenerator` with the config's settings and the built-in prompt.

    A framework adapter sets ``generator.prompt`` to its pipeline's renderer afterwards (it needs the tokenizer).
    """
    section = config.generator
    return LMGenerator(
        unit.model,
        tokenizer,
        max_passage_words=section.max_passage_words,
        max_new_tokens=section.max_new_tokens,
        length_normalize=section.length_normalize,
        unit=unit,
    )


def build_models(
    config: RunConfig, run_dir: Path, adapters: Path | None = None, trainable: bool = True, index=None, load_device: str | None = None
):
    """The selector and generator of a run (see :func:`load_model` for the arguments; ``index`` as
    :func:`load_retriever` takes it, for a retriever selector or the retriever unit).

    When both name the same model (:func:`shares_base`), it is loaded once and carries both adapters. With
    ``retriever.train`` the LM selector holds the third unit, the retriever whose pools it ranks
    (``selector.retriever``).

    Returns:
        ``(selector, LMGenerator)``: an :class:`LMSelector`, or a :class:`RetrieverSelector` for ``selector.kind: retriever``.

    Raises:
        ModelLoadError: a base model cannot be loaded.
    """
    run_dir = Path(run_dir)
    if config.selector.kind == "retriever":
        selector = load_retriever_selector(config, run_dir, adapters, index)
        return selector, make_generator(config, *load_model(config, "generator", run_dir, adapters, trainable, load_device))
    retriever = load_retriever(config, "retriever", run_dir, adapters, index) if config.retriever.train else None
    if not shares_base(config, run_dir):
        selector = make_selector(config, *load_model(config, "selector", run_dir, adapters, trainable, load_device), retriever)
        return selector, make_generator(config, *load_model(config, "generator", run_dir, adapters, trainable, load_device))
    model, tokenizer = _load_base(config, "selector", run_dir, load_device)
    for role in ROLES:
        model = _with_adapter(config, role, model, adapters, trainable)
    _set_checkpointing(config, model, list(ROLES))
    units = {role: AdapterUnit(model, role, trainable) for role in ROLES}
    return make_selector(config, units["selector"], tokenizer, retriever), make_generator(config, units["generator"], tokenizer)


def saved_config(run_dir: str | Path, device: str | None = None) -> RunConfig:
    """The run config saved in a run folder, with ``device`` overridden when given.

    Raises:
        DROError: ``run_dir`` is not a run folder (no config.yaml).
    """
    paths = RunPaths(Path(run_dir))
    if not paths.config.is_file():
        raise DROError(f"{run_dir}: not a run folder (no config.yaml); pass the output_dir of dro optimize")
    config = load_config(paths.config)
    if device is not None:
        try:
            config.device = device
        except ValueError:  # pydantic's ValidationError
            raise DROError(f"--device: '{device[:40]}' is not a device; use auto, cpu, cuda or cuda:N") from None
    return config


def run_code_requests(config: RunConfig, roles: tuple[str, ...] = ROLES, pipeline: bool = True) -> list[str]:
    """What in a run's config would run code when the run is loaded: ``trust_remote_code`` on the models of
    ``roles``; with ``pipeline``, a LlamaIndex factory and extra modules a Haystack pipeline may import."""
    asks = []
    if pipeline and config.pipeline is not None and config.pipeline.llama_index is not None:
        asks.append(f"pipeline.llama_index imports and runs {config.pipeline.llama_index}")
    if pipeline and config.pipeline is not None and config.pipeline.allowed_modules:
        asks.append(f"pipeline.allowed_modules lets the pipeline import {', '.join(config.pipeline.allowed_modules)}")
    asks += [f"{role}.trust_remote_code runs the code of {getattr(config, role).model}" for role in roles if getattr(getattr(config, role), "trust_remote_code", False)]
    return asks


def refuse_run_code(config: RunConfig, run_dir: str | Path, trust_run_code: bool, roles: tuple[str, ...] = ROLES, pipeline: bool = True) -> None:
    """A run folder received from elsewhere runs no code unless its user says so (as Haystack's deserialization
    allowlist does).

    Args:
        roles, pipeline: what the caller loads (:func:`run_code_requests`).

    Raises:
        DROError: the run's config asks to run code and ``trust_run_code`` is off; the message says what it asks
            and the flag that allows it.
    """
    asks = run_code_requests(config, roles, pipeline)
    if asks and not trust_run_code:
        raise DROError(
            f"{run_dir} asks to run code when loaded ({'; '.join(asks)}); if you trust where this run folder comes "
            "from, pass --trust-run-code (trust_run_code=True in Python)"
        )


def load_trained(run_dir: str | Path, device: str | None = None, index=None, trust_run_code: bool = False):
    """The best selector and generator of a finished (or interrupted) run, for inference (``index``: where a
    retriever selector re-retrieves from, see :func:`load_retriever_selector`).

    Returns:
        ``(RunConfig, selector, LMGenerator)``, the selector of the run's kind (:func:`build_models`).

    Raises:
        DROError: ``run_dir`` is not a run folder, or asks to run code (:func:`refuse_run_code`). ModelLoadError: a
            base model cannot be loaded.
    """
    config = saved_config(run_dir, device)
    refuse_run_code(config, run_dir, trust_run_code, pipeline=False)  # the models only; a caller opening the pipeline checks it
    selector, generator = build_models(config, Path(run_dir), adapters=Path(run_dir), trainable=False, index=index)
    return config, selector, generator


def load_trained_selector(run_dir: str | Path, device: str | None = None, trust_run_code: bool = False) -> LMSelector | RetrieverSelector:
    """The best selector of a run, for inference (the generator is not loaded).

    Raises:
        DROError: ``run_dir`` is not a run folder, or asks to run code (:func:`refuse_run_code`). ModelLoadError:
            the base model cannot be loaded.
    """
    config = saved_config(run_dir, device)
    refuse_run_code(config, run_dir, trust_run_code, roles=("selector",), pipeline=False)
    if config.selector.kind == "retriever":
        return load_retriever_selector(config, Path(run_dir), adapters=Path(run_dir))
    return make_selector(config, *load_model(config, "selector", Path(run_dir), adapters=Path(run_dir), trainable=False))


def export_generator(run_dir: str | Path, folder: str | Path) -> Path:
    """Merge the run's best generator adapter into its base model and save a plain Hugging Face folder.

    The folder (safetensors weights, tokenizer, chat template) loads with ``AutoModelForCausalLM`` without
    peft, so a pipeline's generator component can point at it. Written on CPU in float32.

    Raises:
        DROError: ``run_dir`` is not a run folder. ModelLoadError: the base model cannot be loaded.
    """
    config = saved_config(run_dir, "cpu")
    unit, tokenizer = load_model(config, "generator", Path(run_dir), adapters=Path(run_dir), trainable=False)
    unit.model.merge_and_unload().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return Path(folder)
