"""A Haystack pipeline as the thing DRO trains (:class:`dro_plugins.pipeline.TrainablePipeline`).

The pipeline YAML is loaded with Haystack's own loader under its deserialization allowlist (plus the modules the
run config names). From its graph come the candidate source (whatever sends documents to the prompt builder: one
retriever, a joiner of several, a ranker after them, with everything upstream), the prompt builder (the generator's
prompt text) and a ``TransformersChatGenerator`` (the generator model). After training,
:meth:`HaystackPipeline.export` writes the same pipeline with a :class:`DROSelector` between the candidate source and
the prompt builder and the generator pointing at the fine-tuned weights.

With ``selector.kind: retriever`` the trainable selector is the pipeline's own embedding retriever (in a hybrid graph,
the embedding branch): a text embedder (``SentenceTransformersTextEmbedder``) feeding an embedding retriever. Its
model is the query tower; each E-step re-retrieves from the retriever's document store
(:meth:`HaystackPipeline.search`); the exported pipeline is the same graph with the text embedder pointing at the
fine-tuned query tower (``selector/``) and no extra component.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from pathlib import Path

from haystack import Document, Pipeline
from haystack.dataclasses import ChatMessage
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.document_stores.types import DuplicatePolicy
from haystack.marshal import YamlMarshaller
from haystack.utils.hf import convert_message_to_hf_format

from dro_plugins.config import RunConfig, local_model_path
from dro_plugins.data.examples import Passage, load_corpus
from dro_plugins.data.labels import passage_has_answer
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


class _Shown(str):
    """A string that prints bare inside a dict (``{'query': question}``), for the run call shown to users."""

    def __repr__(self) -> str:
        return str(self)


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
QUESTION_INPUTS = ("query", "text")  # candidate-source inputs that take the question (retrievers, rankers; text embedders)
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k")  # generation settings of sampling, not greedy decoding

class HaystackPipeline:
    """The trainable units of a Haystack RAG pipeline.

    Args:
        config: the run config (``pipeline.haystack`` set; ``pipeline.retriever``/``prompt_builder``/``generator``
            name components when the graph is ambiguous; ``documents`` fills an in-memory store).
        index_documents: write ``documents`` into the store now; False only checks that it could (``dro validate``).
        track: shows progress while the documents are embedded.

    The candidates are whatever reaches the prompt builder's documents input: the *candidate source* is the
    component that sends them (a retriever, a ``DocumentJoiner`` of several, a ranker after them; or the one
    ``pipeline.retriever`` names) with every component upstream of it, run as Haystack runs them. The DRO selector goes
    on the edge from the candidate source to the prompt builder. A ranker there is kept by default (the selector
    picks ``selector.top_k`` of its output); naming the component before it as ``pipeline.retriever`` replaces it
    (it is left out of training and of the export). Every candidate-source component that takes ``top_k`` returns
    ``data.num_candidates``, in training and in the export.

    Attributes:
        source: the loaded pipeline cut to the candidate source (the file on disk is never written).
        source_name: the component whose documents are the candidates; ``source_names`` it and all upstream of it.
        generator_model: HF id or folder of the generator component's model.

    Raises:
        PipelineError: the YAML does not load, a unit is missing, ambiguous or not trainable, a named component does
            not exist, or the prompt builder cannot render with a question and documents.
    """

    exported = "optimized Haystack pipeline (load it with load_pipeline)"
    max_new_tokens = None  # the export sets the generator's to generator.max_new_tokens

    def __init__(self, config: RunConfig, index_documents: bool = True, track: Track = no_progress):
        settings = config.pipeline
        self.selector_kind = config.selector.kind
        self.three_units = config.retriever.train  # retriever, LM selector and generator all trained
        self.tower_key = config.retriever_key
        self.path = Path(settings.haystack)
        self.allowed_modules = list(settings.allowed_modules)
        self.num_candidates = config.data.num_candidates
        self.top_k = config.selector.top_k
        self.max_new_tokens = config.generator.max_new_tokens
        self.export_notes: list[str] = []
        self.source = load_pipeline(self.path, self.allowed_modules)  # cut to the candidate source below
        self.serialized = self.source.to_dict()
        self._instances = dict(self.source.walk())
        self.prompt_builder_name = self._find("prompt_builder", settings.prompt_builder, lambda c: _class_name(c) in PROMPT_BUILDERS)
        self.generator_name = self._find("generator", settings.generator, lambda c: _class_name(c).endswith("Generator"))
        self.prompt_builder = self._instances[self.prompt_builder_name]
        self.generator = self._instances[self.generator_name]
        self.documents_variable, self.source_name, self.replaced = self._selector_slot(settings.retriever)
        self.source_names = self._upstream(self.source_name)
        retrievers = [n for n in self.source_names if _class_name(self._instances[n]).endswith("Retriever")]
        if not retrievers:
            raise PipelineError(
                f"{self.path}: no retriever upstream of '{self.source_name}', which sends the prompt builder its documents; "
                "DRO needs a retriever to draw candidates from"
            )
        if self.three_units:  # the LM selector ranks the trained retriever's own top-n: what lies between is replaced
            if len(retrievers) != 1:
                raise PipelineError(
                    f"retriever.train trains one embedding retriever whose top documents the LM selector ranks, but "
                    f"{self.path} joins {len(retrievers)} retrievers ({', '.join(retrievers)}); keep one embedding "
                    "retriever, or remove retriever.train (the LM selector then picks from what they send)"
                )
            if self.source_name != retrievers[0]:
                self.documents_variable, self.source_name, self.replaced = self._selector_slot(retrievers[0])
                self.source_names = self._upstream(self.source_name)
        self.retriever_names = retrievers
        self.retriever_name = self._dense_retriever(retrievers) if len(retrievers) > 1 else retrievers[0]
        self.retriever = self._instances[self.retriever_name]
        if _class_name(self.generator) != TRAINABLE_GENERATOR:
            raise PipelineError(
                f"{self.path}: generator '{self.generator_name}' ({_class_name(self.generator)}) is not a generator "
                f"whose weights DRO can train; use {TRAINABLE_GENERATOR} (transformers-haystack) with a local or Hugging Face model"
            )
        model = self.generator.huggingface_pipeline_kwargs.get("model")
        if not isinstance(model, str):
            raise PipelineError(f"{self.path}: generator '{self.generator_name}' must name its model by id or path")
        self.generator_model = model
        self.question_variable = self._question_variable(settings.question_variable)
        self._documents: dict[str, Document] = {}
        self._query_embedder, self.query_embedder_name = self._query_input()
        self.query_encoder_model = self._query_encoder_model()
        self._cut_to_source()
        self._source_inputs = self._question_inputs()
        self._top_k_inputs = [name for name, sockets in self.source.inputs().items() if "top_k" in sockets]
        self.prompt_text("test question", [Passage(id="test", title="title", text="text")])  # fail early, not mid-run
        if config.documents is not None and index_documents:
            self.index(config.documents, track)
        elif config.documents is not None:  # validation: the store can take the corpus and the corpus reads
            self._in_memory_stores()
            load_corpus(config.documents)

    def components(self) -> list[str]:
        """The graph DRO trains, as lines: the candidate source's components, the selector's slot, the prompt
        builder and the generator (``role 'name' (Class)``)."""
        units = [("retriever", name) for name in self.retriever_names] + [("prompt builder", self.prompt_builder_name), ("generator", self.generator_name)]
        if self.query_embedder_name is not None:
            units = [("query embedder", self.query_embedder_name), *units]
        named = [f"{role} '{name}' ({_class_name(self._instances[name])})" for role, name in units]
        source = ", ".join(f"'{n}' ({_class_name(self._instances[n])})" for n in self.source_names)
        slot = f"{self.source_name}.documents -> {self.prompt_builder_name}.{self.documents_variable}"
        named.append(f"candidate source {source}")
        if self.tower_key is not None:
            inserted = "; no selector is inserted" if self.selector_kind == "retriever" else ""
            named.append(f"trained: the query tower of '{self.retriever_name}' (fed by '{self.query_embedder_name}'){inserted}")
        if self.selector_kind != "retriever":
            named.append(f"selector slot {slot}" + (f" (replaces {', '.join(self.replaced)})" if self.replaced else ""))
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
        found = [n for n, c in self._instances.items() if matches(c)]
        what = unit.replace("_", " ")
        if not found:
            raise PipelineError(
                f"{self.path}: no {what} found among its components ({self._names()}); add one, or name yours "
                f"with pipeline.{unit} in the run config"
            )
        if len(found) > 1:
            raise PipelineError(f"{self.path}: {len(found)} {what}s found ({', '.join(found)}); name one with pipeline.{unit}")
        return found[0]

    def _senders(self, receiver: str) -> list[tuple[str, str, str]]:
        """``(sender, sender socket, receiver socket)`` of each connection into component ``receiver``."""
        found = []
        for connection in self.serialized["connections"]:
            (sender, out), (into, socket) = connection["sender"].split(".", 1), connection["receiver"].split(".", 1)
            if into == receiver:
                found.append((sender, out, socket))
        return found

    def _upstream(self, name: str) -> list[str]:
        """``name`` and every component it depends on, in the pipeline's order."""
        wanted, frontier = {name}, [name]
        while frontier:
            for sender, _, _ in self._senders(frontier.pop()):
                if sender not in wanted:
                    wanted.add(sender)
                    frontier.append(sender)
        return [n for n, _ in self._instances.items() if n in wanted]

    def _selector_slot(self, named: str | None) -> tuple[str, str, list[str]]:
        """``(prompt builder's documents input, candidate source, components the selector replaces)``.

        The candidate source is the component sending documents to the prompt builder, or ``named`` when it is
        upstream of that one (then the components between them are replaced by the selector).

        Raises:
            PipelineError: nothing sends documents to the prompt builder, or ``named`` is not upstream of it.
        """
        into = [(sender, socket) for sender, out, socket in self._senders(self.prompt_builder_name) if out == "documents"]
        if len(into) != 1:
            raise PipelineError(
                f"{self.path}: {'no component sends' if not into else f'{len(into)} components send'} documents to the "
                f"prompt builder '{self.prompt_builder_name}'; DRO puts its selector on the one connection that does "
                "(connect a retriever, joiner or ranker's documents to it)"
            )
        last, socket = into[0]
        if named is None or named == last:
            return socket, last, []
        if named not in self.serialized["components"]:
            raise PipelineError(f"pipeline.retriever: no component named '{named}' in {self.path}; its components are {self._names()}")
        upstream = self._upstream(last)
        if named not in upstream:
            raise PipelineError(
                f"pipeline.retriever: '{named}' does not feed the documents that reach the prompt builder (those come from "
                f"{', '.join(upstream)}); name one of them"
            )
        replaced = [n for n in upstream if n != named and named in self._upstream(n)]
        return socket, named, replaced

    def _dense_retriever(self, retrievers: list[str]) -> str:
        """The embedding retriever among several (hybrid retrieval): the branch a retriever selector trains, BM25
        and the others staying as they are; for an LM selector, the first one when none embeds.

        Raises:
            PipelineError: ``selector.kind: retriever`` with no embedding retriever, or more than one.
        """
        dense = [n for n in retrievers if "query_embedding" in inspect.signature(self._instances[n].run).parameters]
        if self.tower_key is not None and len(dense) != 1:
            raise PipelineError(
                f"{self.tower_key} trains the query tower of one embedding retriever, but the candidates here come "
                f"from {len(dense)} embedding retrievers among {', '.join(retrievers)}; use selector.kind lm (it selects from "
                "what they feed the prompt builder)"
            )
        return dense[0] if dense else retrievers[0]

    def _cut_to_source(self) -> None:
        """Take every component but the candidate source's out of the loaded pipeline (the prompt builder and the
        generator are then called directly, outside any pipeline)."""
        for name in self._instances:
            if name not in self.source_names:
                self.source.remove_component(name)

    def _question_inputs(self) -> dict[str, list[str]]:
        """The candidate source's inputs that receive the question (``query``/``text`` inputs nothing else feeds).

        Raises:
            PipelineError: a component of the candidate source needs another input that nothing feeds.
        """
        wanted: dict[str, list[str]] = {}
        for name, sockets in self.source.inputs().items():
            for socket, spec in sockets.items():
                if socket in QUESTION_INPUTS:
                    wanted.setdefault(name, []).append(socket)
                elif spec["is_mandatory"]:
                    raise PipelineError(
                        f"{self.path}: '{name}' needs the input '{socket}', which DRO cannot give when it retrieves candidates "
                        f"(it passes the question to {' and '.join(QUESTION_INPUTS)} inputs); give it a default"
                    )
        return wanted

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
                    embedder = self._instances[name]
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
            PipelineError: ``selector.kind: retriever`` or ``retriever.train`` with a retriever that is not fed by such an
                embedder.
        """
        model = getattr(self._query_embedder, "model", None)
        if self.tower_key is None:
            return model if isinstance(model, str) else None
        if not isinstance(model, str):
            alternative = "selector.kind lm" if self.selector_kind == "retriever" else "remove retriever.train"
            raise PipelineError(
                f"{self.tower_key} trains the pipeline's query embedder, but the retriever '{self.retriever_name}' "
                f"is not fed by a SentenceTransformersTextEmbedder; use an embedding retriever with one, or {alternative}"
            )
        return model

    @property
    def query_affixes(self) -> tuple[str, str]:
        """The text the query embedder puts before and after a question (its ``prefix`` and ``suffix``)."""
        return getattr(self._query_embedder, "prefix", "") or "", getattr(self._query_embedder, "suffix", "") or ""

    def index(self, corpus: Path, track: Track = no_progress) -> int:
        """Write a corpus file into the in-memory document store of each retriever of the candidate source (once per
        store: retrievers given one store share it); returns the number of documents.

        With an embedding retriever the documents are embedded first by Haystack's ``SentenceTransformersDocumentEmbedder``
        with the text embedder's model (title and text, as the retriever selector embeds them), ``EMBED_CHUNK``
        documents per progress step.

        Raises:
            PipelineError: the store is not an in-memory store, or the retriever's documents need an embedder DRO
                cannot tell.
            DataError: the corpus file is unreadable.
        """
        documents = [Document(id=p.id, content=p.text, meta={"title": p.title}) for p in load_corpus(corpus)]
        stores = self._in_memory_stores()
        if self._query_embedder is not None:
            embedder = self._document_embedder()
            embedder.warm_up()
            chunks = [documents[i : i + EMBED_CHUNK] for i in range(0, len(documents), EMBED_CHUNK)]
            documents = [d for chunk in track(chunks, "embed documents", len(chunks)) for d in embedder.run(documents=chunk)["documents"]]
        return [store.write_documents(documents, policy=DuplicatePolicy.OVERWRITE) for store in stores][0]

    def _document_embedder(self):
        """The document tower as DRO embeds a corpus (title and text, normalised): what the store's embeddings and a
        retriever selector's scores come from."""
        from haystack_integrations.components.embedders.sentence_transformers import SentenceTransformersDocumentEmbedder

        return SentenceTransformersDocumentEmbedder(
            model=local_model_path(self.query_encoder_model, Path.cwd()), meta_fields_to_embed=["title"], normalize_embeddings=True,
            progress_bar=False,
        )

    def _in_memory_stores(self) -> list[InMemoryDocumentStore]:
        """The candidate source's document stores, one per storage (shared in-memory stores of one index count once).

        Raises:
            PipelineError: a retriever does not search an in-memory store, or one searched by embedding is not fed
                by a sentence-transformers text embedder (DRO could not embed the corpus as it does).
        """
        stores = {}
        for name in self.retriever_names:
            store = getattr(self._instances[name], "document_store", None)
            dense = "query_embedding" in inspect.signature(self._instances[name].run).parameters
            if not isinstance(store, InMemoryDocumentStore) or (dense and (name != self.retriever_name or self.query_encoder_model is None)):
                raise PipelineError(
                    f"documents: the retriever '{name}' does not search an in-memory store by text or through a "
                    "sentence-transformers text embedder, so it cannot be filled from a corpus file; index your documents "
                    "into its store yourself and remove documents:"
                )
            settings = store.to_dict()["init_parameters"]
            stores.setdefault(settings["index"] if settings.get("shared", True) else id(store), store)
        return list(stores.values())

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
        """The candidate source's top ``num_candidates`` documents for ``question``, as passages, best first: the
        source pipeline run with the question on its query inputs and ``top_k=num_candidates`` on each component that
        takes one (retrievers, joiners, rankers)."""
        data = {name: {socket: question for socket in sockets} for name, sockets in self._source_inputs.items()}
        for name in self._top_k_inputs:
            data.setdefault(name, {})["top_k"] = num_candidates
        documents = self.source.run(data, include_outputs_from={self.source_name})[self.source_name]["documents"][:num_candidates]
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
        DROSelector (the run folder) goes between the candidate source and the prompt builder, in place of the
        components ``pipeline.retriever`` had it replace; each candidate-source component with a ``top_k`` returns
        ``data.num_candidates`` documents, the selector keeps ``selector.top_k``. With a retriever selector, the text
        embedder points at the fine-tuned query tower (``<run_dir>/selector``) and the retriever returns
        ``selector.top_k``; the document store's embeddings (the frozen document tower's) stay valid. With the retriever
        unit (``retriever.train``) both happen: the text embedder points at ``<run_dir>/retriever`` and a DROSelector
        ranks the retriever's top ``data.num_candidates`` (in place of any ranker between them). Model folders
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
        if self.query_encoder_model is not None:
            self._write_document_embedder(run_dir)
        if self.selector_kind == "retriever":
            components[self.query_embedder_name]["init_parameters"]["model"] = str(RunPaths(run_dir).adapter("selector"))
            if self.source_name == self.retriever_name:
                components[self.retriever_name]["init_parameters"]["top_k"] = self.top_k
            else:
                self.export_notes.append(
                    f"only the query tower of '{self.retriever_name}' changed; what reaches the prompt builder is still "
                    f"decided by {', '.join(n for n in self.source_names if n not in (self.retriever_name, self.query_embedder_name))} "
                    "as before (dro evaluate --served measures it)"
                )
            return self._write(tree, run_dir)
        if self.three_units:
            components[self.query_embedder_name]["init_parameters"]["model"] = str(RunPaths(run_dir).adapter("retriever"))
        for name in self.source_names:
            if "top_k" in components[name].get("init_parameters", {}):
                components[name]["init_parameters"]["top_k"] = self.num_candidates
        for name in self.replaced:
            del components[name]
        components[SELECTOR_NAME] = DROSelector(model=str(run_dir), top_k=self.top_k).to_dict()
        into_builder = f"{self.prompt_builder_name}.{self.documents_variable}"
        tree["connections"] = [
            c for c in tree["connections"]
            if c["receiver"] != into_builder and not {c["sender"].split(".")[0], c["receiver"].split(".")[0]} & set(self.replaced)
        ] + [
            {"sender": f"{self.source_name}.documents", "receiver": f"{SELECTOR_NAME}.documents"},
            {"sender": f"{SELECTOR_NAME}.documents", "receiver": into_builder},
        ]
        if self.replaced:
            why = "retriever.train: it ranks the trained retriever's own top documents" if self.three_units else f"pipeline.retriever is '{self.source_name}'"
            self.export_notes.append(f"the DRO selector takes the place of {', '.join(self.replaced)} ({why})")
        return self._write(tree, run_dir)

    def _run_inputs(self, pipeline: Pipeline, question, other=None) -> dict[str, dict]:
        """``pipeline.run``'s data for a question: the question on each mandatory input that takes it (``query`` and
        ``text`` inputs, the prompt's question variable), ``other`` on any other mandatory input."""
        takes_question = (*QUESTION_INPUTS, self.question_variable)
        data = {
            name: {socket: question if socket in takes_question else other for socket, spec in sockets.items() if spec["is_mandatory"]}
            for name, sockets in pipeline.inputs().items()
        }
        return {name: sockets for name, sockets in data.items() if sockets}

    def _run_call(self, pipeline: Pipeline) -> str:
        """How to call ``pipeline.run`` with a question, as Python: ``pipe.run({'retriever': {'query': question}, ...})``."""
        return f"pipe.run({self._run_inputs(pipeline, _Shown('question'), _Shown('...'))})"

    def served(self, run_dir: Path) -> dict[str, Callable[[str], tuple[str, list[Passage]]]]:
        """The user's pipeline and the exported one, each as ``question -> (answer, passages given to the prompt)``,
        run by Haystack's ``Pipeline.run`` (``dro evaluate --served``). Their in-memory stores are filled with the
        documents DRO indexed when they load empty.

        Raises:
            PipelineError: the run folder has no exported ``pipeline.yaml``, or a pipeline needs an input other than
                the question.
        """
        exported = RunPaths(Path(run_dir)).pipeline
        if not exported.is_file():
            raise PipelineError(f"{run_dir}: no pipeline.yaml (the run exports it when training finishes); run dro optimize to the end")
        return {
            "original": self._answerer(load_pipeline(self.path, self.allowed_modules)),
            "optimized": self._answerer(load_pipeline(exported, self.allowed_modules)),
        }

    def framework_scores(self, answers: list[str], gold: list[list[str]], passages: list[list[Passage]]) -> dict[str, float]:
        """Haystack's ``AnswerExactMatchEvaluator`` (exact string match with each question's first gold answer) and
        ``DocumentRecallEvaluator``/``DocumentMRREvaluator`` (single hit; relevant: the passages holding an answer)."""
        from haystack.components.evaluators import AnswerExactMatchEvaluator, DocumentMRREvaluator, DocumentRecallEvaluator

        retrieved = [[Document(content=p.text) for p in given] for given in passages]
        relevant = [[d for d, p in zip(docs, given) if passage_has_answer(p, golds)] for docs, given, golds in zip(retrieved, passages, gold)]
        documents = {"ground_truth_documents": relevant, "retrieved_documents": retrieved}
        return {
            "haystack answer exact match": AnswerExactMatchEvaluator().run(ground_truth_answers=[g[0] for g in gold], predicted_answers=answers)["score"],
            "haystack document recall": DocumentRecallEvaluator().run(**documents)["score"],
            "haystack document MRR": DocumentMRREvaluator().run(**documents)["score"],
        }

    def _answerer(self, pipeline: Pipeline) -> Callable[[str], tuple[str, list[Passage]]]:
        documents = [d for store in self._in_memory_stores() for d in store.filter_documents()]
        for _, instance in pipeline.walk():
            store = getattr(instance, "document_store", None)
            if isinstance(store, InMemoryDocumentStore) and store.count_documents() == 0:
                store.write_documents(documents, policy=DuplicatePolicy.OVERWRITE)
        builder_input = f"{self.prompt_builder_name}.{self.documents_variable}"
        feeder = next(c["sender"].split(".")[0] for c in pipeline.to_dict()["connections"] if c["receiver"] == builder_input)
        inputs = self._run_inputs(pipeline, True, False)  # True where the question goes, computed once per pipeline
        if not all(v for sockets in inputs.values() for v in sockets.values()):
            raise PipelineError(f"{self.path}: serving needs inputs besides the question ({self._run_call(pipeline)}); give them defaults")

        def answer(question: str) -> tuple[str, list[Passage]]:
            data = {name: {socket: question for socket in sockets} for name, sockets in inputs.items()}
            out = pipeline.run(data, include_outputs_from={feeder})
            replies = out.get(self.generator_name, {}).get("replies") or []
            return (replies[0].text or "" if replies else ""), [document_to_passage(d) for d in out[feeder]["documents"]]

        return answer

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

    def _write_document_embedder(self, run_dir: Path) -> None:
        """``<run_dir>/document-embedder.yaml``: a one-component pipeline that embeds documents as the run's store
        was embedded, for filling the exported pipeline's store (``run({"document_embedder": {"documents": docs}})``)."""
        indexing = Pipeline()
        indexing.add_component("document_embedder", self._document_embedder())
        out = RunPaths(run_dir).document_embedder
        atomic_write_text(out, indexing.dumps())
        self.export_notes.append(f"embed the documents of its store with {out} (the document tower the retriever was trained against)")

    def _write(self, tree: dict, run_dir: Path) -> Path:
        tree["metadata"] = {**(tree.get("metadata") or {}), RUN_DIR_KEY: str(run_dir)}
        optimized = Pipeline.from_dict(tree, allowed_modules=self.allowed_modules or None)
        self.export_notes.append(f"run the exported pipeline with {self._run_call(optimized)}")
        out = RunPaths(run_dir).pipeline
        atomic_write_text(out, optimized.dumps())
        return out
