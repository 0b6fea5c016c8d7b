"""A Haystack pipeline as the thing DRO trains (:class:`dro_plugins.pipeline.TrainablePipeline`).

The pipeline YAML is loaded with Haystack's own loader under its deserialization allowlist (plus the modules the
run config names). From its graph come the retriever (candidates), the prompt builder (the generator's prompt
text) and a ``TransformersChatGenerator`` (the generator model). After training, :meth:`HaystackPipeline.export`
writes the same pipeline with a :class:`DROSelector` between retriever and prompt builder and the generator pointing
at the fine-tuned weights.

With ``selector.kind: retriever`` the trainable selector is the pipeline's own retriever: a text embedder
(``SentenceTransformersTextEmbedder``) feeding an embedding retriever. Its model is the query tower; each E-step
re-retrieves from the retriever's document store (:meth:`HaystackPipeline.search`); the exported pipeline is the
same graph with the text embedder pointing at the fine-tuned query tower (``selector/``) and no extra component.
"""

from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path

from haystack import Document, Pipeline
from haystack.dataclasses import ChatMessage
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.document_stores.types import DuplicatePolicy
from haystack.marshal import YamlMarshaller
from haystack.utils.hf import convert_message_to_hf_format

from dro_plugins.config import RunConfig, local_model_path
from dro_plugins.data.examples import Passage, load_corpus
from dro_plugins.errors import PipelineError
from dro_plugins.files import atomic_write_text
from dro_plugins.modeling.generator import PromptEncoder, PromptRenderer
from dro_plugins.modeling.tokenization import encode_like_transformers_pipeline
from dro_plugins.reporting.progress import Track, no_progress
from dro_plugins.build import export_generator
from dro_plugins.training.run_folder import RunPaths
from haystack_integrations.components.rankers.dro.selector import DROSelector, document_to_passage

SELECTOR_NAME = "dro_selector"
TRAINABLE_GENERATOR = "TransformersChatGenerator"
PROMPT_BUILDERS = ("ChatPromptBuilder", "PromptBuilder")


RUN_DIR_KEY = "dro_run_dir"  # the pipeline metadata key holding the run folder the exported paths were written in


class RunFolderPaths(YamlMarshaller):
    """Haystack's YAML marshaller that re-bases the model folders of a moved run folder.

    An exported ``pipeline.yaml`` names its models by absolute path (so Haystack's own ``Pipeline.load`` works from
    any working directory) and records the run folder it was written in as ``metadata.dro_run_dir``. Reading, a
    ``model`` setting (at any depth of a component's ``init_parameters``) inside that recorded folder is moved to the
    same place inside ``folder``, the YAML file's folder now; a relative one (a run exported before the absolute
    scheme, or a hand-written YAML) is looked up beside the file, then in the current directory.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder).resolve()

    def unmarshal(self, data_) -> dict:
        tree = super().unmarshal(data_)
        recorded = (tree.get("metadata") or {}).get(RUN_DIR_KEY)
        return _map_models(tree, lambda model: self._rebased(model, recorded))

    def _rebased(self, model: str, recorded: str | None) -> str:
        path = Path(model)
        if not path.is_absolute():
            return local_model_path(model, self.folder)
        if recorded and path.is_relative_to(recorded):
            return str(self.folder / path.relative_to(recorded))
        return model


def _map_models(tree, change):
    """``tree`` with every string under a ``model`` key replaced by ``change(value)``."""
    if isinstance(tree, dict):
        return {k: change(v) if k == "model" and isinstance(v, str) else _map_models(v, change) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map_models(v, change) for v in tree]
    return tree


def _without_store_index(parameters: dict) -> dict:
    """A component's ``init_parameters`` without its document store's ``index`` (a uuid when the YAML sets none)."""
    store = parameters.get("document_store")
    if not isinstance(store, dict):
        return parameters
    store_parameters = {k: v for k, v in store.get("init_parameters", {}).items() if k != "index"}
    return parameters | {"document_store": store | {"init_parameters": store_parameters}}


def load_pipeline(path: Path, allowed_modules: list[str] = ()) -> Pipeline:
    """``Pipeline.load`` under Haystack's default allowlist plus ``allowed_modules``; never ``unsafe``.

    Model folders of a moved run folder are re-based to where the file is now (:class:`RunFolderPaths`).

    Raises:
        PipelineError: the file is missing or Haystack refuses to load it.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found; set pipeline.haystack to your pipeline YAML")
    try:
        with path.open(encoding="utf-8") as fp:
            return Pipeline.load(fp, marshaller=RunFolderPaths(path.parent), allowed_modules=list(allowed_modules) or None)
    except Exception as exc:  # noqa: BLE001 - Haystack raises several types; each becomes one clear line
        reason = " ".join(str(exc).split())[:300]
        raise PipelineError(
            f"{path}: Haystack refuses to load this pipeline ({type(exc).__name__}: {reason}). If it uses components "
            "from your own modules, list them in pipeline.allowed_modules of the run config (e.g. ['mypkg.*'])"
        ) from exc


def _class_name(instance) -> str:
    return type(instance).__name__


EMBED_CHUNK = 256  # documents embedded per progress step
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k")  # generation settings of sampling, not greedy decoding

class HaystackPipeline:
    """The trainable units of a Haystack RAG pipeline.

    Args:
        config: the run config (``pipeline.haystack`` set; ``pipeline.retriever``/``prompt_builder``/``generator``
            name components when the graph is ambiguous; ``documents`` fills an in-memory store).
        index_documents: write ``documents`` into the store now; False only checks that it could (``dro validate``).
        track: shows progress while the documents are embedded.

    Attributes:
        pipeline: the loaded Haystack pipeline (the file on disk is never written).
        generator_model: HF id or folder of the generator component's model.

    Raises:
        PipelineError: the YAML does not load, a unit is missing, ambiguous or not trainable, a named component does
            not exist, or the prompt builder cannot render with a question and documents.
    """

    exported = "optimized Haystack pipeline (load it with load_pipeline)"

    def __init__(self, config: RunConfig, index_documents: bool = True, track: Track = no_progress):
        settings = config.pipeline
        self.selector_kind = config.selector.kind
        self.path = Path(settings.haystack)
        self.allowed_modules = list(settings.allowed_modules)
        self.num_candidates = config.data.num_candidates
        self.top_k = config.selector.top_k
        self.max_new_tokens = config.generator.max_new_tokens
        self.export_notes: list[str] = []
        self.pipeline = load_pipeline(self.path, self.allowed_modules)
        self.serialized = self.pipeline.to_dict()
        self.retriever_name = self._find("retriever", settings.retriever, lambda c: _class_name(c).endswith("Retriever"))
        self.prompt_builder_name = self._find("prompt_builder", settings.prompt_builder, lambda c: _class_name(c) in PROMPT_BUILDERS)
        self.generator_name = self._find("generator", settings.generator, lambda c: _class_name(c).endswith("Generator"))
        self.retriever = self.pipeline.get_component(self.retriever_name)
        self.prompt_builder = self.pipeline.get_component(self.prompt_builder_name)
        self.generator = self.pipeline.get_component(self.generator_name)
        if _class_name(self.generator) != TRAINABLE_GENERATOR:
            raise PipelineError(
                f"{self.path}: generator '{self.generator_name}' ({_class_name(self.generator)}) is not a generator "
                f"whose weights DRO can train; use {TRAINABLE_GENERATOR} (transformers-haystack) with a local or Hugging Face model"
            )
        model = self.generator.huggingface_pipeline_kwargs.get("model")
        if not isinstance(model, str):
            raise PipelineError(f"{self.path}: generator '{self.generator_name}' must name its model by id or path")
        self.generator_model = model
        self.documents_variable = self._documents_socket()
        self.question_variable = self._question_variable(settings.question_variable)
        self._documents: dict[str, Document] = {}
        self._query_embedder, self.query_embedder_name = self._query_input()
        self.query_encoder_model = self._query_encoder_model()
        self.prompt_text("test question", [Passage(id="test", title="title", text="text")])  # fail early, not mid-run
        if config.documents is not None and index_documents:
            self.index(config.documents, track)
        elif config.documents is not None:  # validation: the store can take the corpus and the corpus reads
            self._in_memory_store()
            load_corpus(config.documents)

    def components(self) -> list[str]:
        """The trainable units found in the graph, as ``role 'name' (Class)`` lines."""
        units = (("retriever", self.retriever_name), ("prompt builder", self.prompt_builder_name), ("generator", self.generator_name))
        if self.query_embedder_name is not None:
            units = (("query embedder", self.query_embedder_name), *units)
        named = [f"{role} '{name}' ({_class_name(self.pipeline.get_component(name))})" for role, name in units]
        encoder = [f"query encoder model {self.query_encoder_model}"] if self.query_encoder_model else []
        warning = []
        if "task" not in self.generator.huggingface_pipeline_kwargs:
            warning = [
                f"warning: generator '{self.generator_name}' names no task, so Haystack asks the Hugging Face hub for it "
                "when serving (which fails offline); the exported pipeline sets task: text-generation"
            ]
        return named + encoder + [f"generator model {self.generator_model}"] + warning

    def _names(self) -> str:
        return ", ".join(self.serialized["components"])

    def _find(self, unit: str, name: str | None, matches) -> str:
        if name is not None:
            if name not in self.serialized["components"]:
                raise PipelineError(
                    f"pipeline.{unit}: no component named '{name}' in {self.path}; its components are {self._names()}"
                )
            return name
        found = [n for n, c in self.pipeline.walk() if matches(c)]
        what = unit.replace("_", " ")
        if not found:
            raise PipelineError(
                f"{self.path}: no {what} found among its components ({self._names()}); add one, or name yours "
                f"with pipeline.{unit} in the run config"
            )
        if len(found) > 1:
            raise PipelineError(f"{self.path}: {len(found)} {what}s found ({', '.join(found)}); name one with pipeline.{unit}")
        return found[0]

    def _documents_socket(self) -> str:
        """The prompt builder's input that receives the retriever's documents (where the selector goes)."""
        for connection in self.serialized["connections"]:
            sender, receiver = connection["sender"].split(".", 1), connection["receiver"].split(".", 1)
            if sender == [self.retriever_name, "documents"] and receiver[0] == self.prompt_builder_name:
                return receiver[1]
        raise PipelineError(
            f"{self.path}: the retriever '{self.retriever_name}' must send its documents straight to the prompt builder "
            f"'{self.prompt_builder_name}' (connect {self.retriever_name}.documents -> {self.prompt_builder_name}.documents); "
            "the DRO selector is inserted on that connection"
        )

    def _question_variable(self, named: str | None) -> str:
        variables = [v for v in self.prompt_builder.variables if v != self.documents_variable]
        if named is not None:
            if named not in variables:
                raise PipelineError(
                    f"pipeline.question_variable: '{named}' is not a variable of the prompt builder's template "
                    f"({', '.join(variables) or 'none'})"
                )
            return named
        if len(variables) == 1:
            return variables[0]
        for common in ("query", "question"):
            if common in variables:
                return common
        raise PipelineError(
            f"{self.path}: cannot tell which template variable of '{self.prompt_builder_name}' holds the question "
            f"({', '.join(variables) or 'none'}); set pipeline.question_variable"
        )

    def _query_input(self):
        """``(None, None)`` when the retriever takes the query text; else the text embedder that feeds its query
        embedding, and its component name."""
        parameters = inspect.signature(self.retriever.run).parameters
        if "query" in parameters:
            return None, None
        if "query_embedding" in parameters:
            for connection in self.serialized["connections"]:
                if connection["receiver"] == f"{self.retriever_name}.query_embedding":
                    name = connection["sender"].split(".", 1)[0]
                    embedder = self.pipeline.get_component(name)
                    if getattr(embedder, "progress_bar", None):  # one bar per query would flood the training log
                        embedder.progress_bar = False  # (the loaded copy only: the export starts from the YAML's settings)
                    if hasattr(embedder, "warm_up"):
                        embedder.warm_up()
                    return embedder, name
        raise PipelineError(
            f"{self.path}: retriever '{self.retriever_name}' takes neither a query text nor a query embedding from a "
            "text embedder; DRO needs one of them to retrieve training candidates"
        )

    def _query_encoder_model(self) -> str | None:
        """The text embedder's sentence-transformers model (the query tower a retriever selector trains), or None.

        Raises:
            PipelineError: ``selector.kind: retriever`` with a retriever that is not fed by such an embedder.
        """
        model = getattr(self._query_embedder, "model", None)
        if self.selector_kind != "retriever":
            return model if isinstance(model, str) else None
        if not isinstance(model, str):
            raise PipelineError(
                f"selector.kind retriever trains the pipeline's query embedder, but the retriever '{self.retriever_name}' "
                "is not fed by a SentenceTransformersTextEmbedder; use an embedding retriever with one, or selector.kind lm"
            )
        return model

    @property
    def query_affixes(self) -> tuple[str, str]:
        """The text the query embedder puts before and after a question (its ``prefix`` and ``suffix``)."""
        return getattr(self._query_embedder, "prefix", "") or "", getattr(self._query_embedder, "suffix", "") or ""

    def index(self, corpus: Path, track: Track = no_progress) -> int:
        """Write a corpus file into the retriever's in-memory document store; returns the number of documents.

        For an embedding retriever the documents are embedded first by Haystack's ``SentenceTransformersDocumentEmbedder``
        with the text embedder's model (title and text, as the retriever selector embeds them), ``EMBED_CHUNK``
        documents per progress step.

        Raises:
            PipelineError: the store is not an in-memory store, or the retriever's documents need an embedder DRO
                cannot tell.
            DataError: the corpus file is unreadable.
        """
        documents = [Document(id=p.id, content=p.text, meta={"title": p.title}) for p in load_corpus(corpus)]
        store = self._in_memory_store()
        if self._query_embedder is not None:
            from haystack_integrations.components.embedders.sentence_transformers import SentenceTransformersDocumentEmbedder

            embedder = SentenceTransformersDocumentEmbedder(
                model=self.query_encoder_model, meta_fields_to_embed=["title"], normalize_embeddings=True, progress_bar=False
            )
            embedder.warm_up()
            chunks = [documents[i : i + EMBED_CHUNK] for i in range(0, len(documents), EMBED_CHUNK)]
            documents = [d for chunk in track(chunks, "embed documents", len(chunks)) for d in embedder.run(documents=chunk)["documents"]]
        return store.write_documents(documents, policy=DuplicatePolicy.OVERWRITE)

    def _in_memory_store(self) -> InMemoryDocumentStore:
        store = getattr(self.retriever, "document_store", None)
        if not isinstance(store, InMemoryDocumentStore) or (self._query_embedder is not None and self.query_encoder_model is None):
            raise PipelineError(
                f"documents: the retriever '{self.retriever_name}' does not search an in-memory store by text or through a "
                "sentence-transformers text embedder, so it cannot be filled from a corpus file; index your documents "
                "into its store yourself and remove documents:"
            )
        return store

    def search(self, queries, n: int) -> list[list[tuple[Passage, list[float] | None]]]:
        """The retriever's top ``n`` documents for each query embedding ``[B, d]`` (a query tower's), with their
        stored embeddings: the index a retriever selector re-retrieves its pools from
        (:class:`dro_plugins.selectors.index.DenseIndex`)."""
        hits, options = [], {"return_embedding": True} if "return_embedding" in inspect.signature(self.retriever.run).parameters else {}
        for query in queries.tolist():
            documents = self.retriever.run(query_embedding=query, top_k=n, **options)["documents"]
            for document in documents:
                self._documents[str(document.id)] = document
            hits.append([(document_to_passage(d), d.embedding) for d in documents])
        return hits

    def retrieve(self, question: str, num_candidates: int) -> list[Passage]:
        """The retriever's top ``num_candidates`` documents for ``question``, as passages, best first."""
        if self._query_embedder is None:
            documents = self.retriever.run(query=question, top_k=num_candidates)["documents"]
        else:
            embedding = self._query_embedder.run(text=question)["embedding"]
            documents = self.retriever.run(query_embedding=embedding, top_k=num_candidates)["documents"]
        for document in documents:
            self._documents[str(document.id)] = document
        return [document_to_passage(d) for d in documents]

    def prompt_text(self, question: str, passages: list[Passage]) -> list[dict]:
        """The chat messages (Hugging Face format) the prompt builder renders for a question and passages.

        Raises:
            PipelineError: the template needs variables other than the question and the documents.
        """
        documents = [
            self._documents.get(p.id) or Document(id=p.id, content=p.text, meta={"title": p.title}) for p in passages
        ]
        try:
            prompt = self.prompt_builder.run(**{self.question_variable: question, self.documents_variable: documents})["prompt"]
        except Exception as exc:  # noqa: BLE001 - a template error becomes one line naming the component
            raise PipelineError(
                f"{self.path}: prompt builder '{self.prompt_builder_name}' cannot render with only the question and the "
                f"documents ({type(exc).__name__}: {exc}); give its other variables defaults"
            ) from exc
        messages = [ChatMessage.from_user(prompt)] if isinstance(prompt, str) else prompt
        return [convert_message_to_hf_format(m) for m in messages]

    def prompt_renderer(self, tokenizer) -> PromptRenderer:
        """Prompt builder, then the chat template exactly as ``TransformersChatGenerator`` applies it."""

        def render(question: str, passages) -> str:
            return tokenizer.apply_chat_template(
                self.prompt_text(question, list(passages)),
                tokenize=False,
                chat_template=self.generator.chat_template,
                add_generation_prompt=True,
                enable_thinking=self.generator.enable_thinking,
            )

        return render

    def prompt_encoder(self, tokenizer) -> PromptEncoder:
        """``tokenizer(text)``, as the generator component tokenizes the rendered prompt when serving."""
        return encode_like_transformers_pipeline(tokenizer)

    def export(self, run_dir: Path) -> Path:
        """Write ``<run_dir>/pipeline.yaml``: the pipeline with its trained selector and the fine-tuned generator.

        The generator is merged into its base model in ``<run_dir>/generator-model``. With an LM selector, a
        DROSelector (the run folder, ``.``) goes between retriever and prompt builder; the retriever returns
        ``data.num_candidates`` documents, the selector keeps ``selector.top_k``. With a retriever selector, the text
        embedder points at the fine-tuned query tower (``<run_dir>/selector``) and the retriever returns
        ``selector.top_k``; the document store's embeddings (the frozen document tower's) stay valid. Model folders
        are absolute, so ``Pipeline.load`` reads the file from any working directory; the file records the run folder
        (``metadata.dro_run_dir``), so :func:`load_pipeline` still loads it after the folder is moved.

        Raises:
            PipelineError: the pipeline already has a component named ``dro_selector``.
        """
        run_dir = Path(run_dir).resolve()
        if SELECTOR_NAME in self.serialized["components"]:
            raise PipelineError(f"{self.path}: already has a component named '{SELECTOR_NAME}'; rename it")
        generator_dir = export_generator(run_dir, RunPaths(run_dir).generator_model)
        tree = copy.deepcopy(self.serialized)  # the pipeline as loaded, before DRO set anything on its components
        components = tree["components"]
        generator = components[self.generator_name]["init_parameters"]
        generator["huggingface_pipeline_kwargs"]["model"] = str(generator_dir)
        self.export_notes = self._served_as_trained(generator)
        if self.selector_kind == "retriever":
            components[self.retriever_name]["init_parameters"]["top_k"] = self.top_k
            components[self.query_embedder_name]["init_parameters"]["model"] = str(RunPaths(run_dir).adapter("selector"))
            return self._write(tree, run_dir)
        components[self.retriever_name]["init_parameters"]["top_k"] = self.num_candidates
        components[SELECTOR_NAME] = DROSelector(model=str(run_dir), top_k=self.top_k).to_dict()
        into_builder = f"{self.prompt_builder_name}.{self.documents_variable}"
        tree["connections"] = [
            c for c in tree["connections"] if (c["sender"], c["receiver"]) != (f"{self.retriever_name}.documents", into_builder)
        ] + [
            {"sender": f"{self.retriever_name}.documents", "receiver": f"{SELECTOR_NAME}.documents"},
            {"sender": f"{SELECTOR_NAME}.documents", "receiver": into_builder},
        ]
        self.export_notes.append(
            f"the exported pipeline takes the query twice: pipe.run({{'{self.retriever_name}': {{...}}, "
            f"'{SELECTOR_NAME}': {{'query': question}}, '{self.prompt_builder_name}': {{...}}}})"
        )
        return self._write(tree, run_dir)

    def fingerprint_parts(self) -> dict[str, object]:
        """The loaded graph by part: components and connections, the prompt builder's settings (its template), the
        generator's settings, and every other component's settings (a document store's random ``index`` name
        aside, which Haystack draws anew at each load)."""
        components = self.serialized["components"]
        settings = {name: _without_store_index(c.get("init_parameters", {})) for name, c in components.items()}
        return {
            "graph": {"components": {name: c["type"] for name, c in components.items()}, "connections": self.serialized["connections"]},
            "prompt template": settings.pop(self.prompt_builder_name),
            "generator settings": settings.pop(self.generator_name),
            "retrieval settings": settings,
        }

    def _served_as_trained(self, generator: dict) -> list[str]:
        """Make the exported generator answer as DRO validated it (greedy, ``generator.max_new_tokens``, an explicit
        task so that loading needs no hub); return what was changed, in words."""
        notes = []
        kwargs = generator["huggingface_pipeline_kwargs"]
        if "task" not in kwargs:
            kwargs["task"] = "text-generation"
            notes.append("set the generator's task to text-generation (without it Haystack asks the hub when loading)")
        settings = dict(generator.get("generation_kwargs") or {})
        sampling = sorted(k for k in SAMPLING_KEYS if k in settings and (k != "do_sample" or settings[k]))
        wanted = {k: v for k, v in settings.items() if k not in SAMPLING_KEYS} | {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        if settings != wanted:
            before = ", ".join(f"{k}={settings[k]}" for k in sorted(settings) if settings.get(k) != wanted.get(k)) or "defaults"
            notes.append(
                f"generation set to what DRO validated: greedy, max_new_tokens={self.max_new_tokens} (was {before}"
                + (f"; {', '.join(sampling)} dropped" if sampling else "") + ")"
            )
        generator["generation_kwargs"] = wanted
        return notes

    def _write(self, tree: dict, run_dir: Path) -> Path:
        tree["metadata"] = {**(tree.get("metadata") or {}), RUN_DIR_KEY: str(run_dir)}
        optimized = Pipeline.from_dict(tree, allowed_modules=self.allowed_modules or None)
        out = RunPaths(run_dir).pipeline
        atomic_write_text(out, optimized.dumps())
        return out
