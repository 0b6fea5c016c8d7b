"""A LlamaIndex query engine as the thing DRO trains (:class:`dro_plugins.pipeline.TrainablePipeline`).

LlamaIndex apps are Python, so the run config names a factory, ``pipeline.llama_index: "app.py:build_query_engine"``,
a function that returns a ``RetrieverQueryEngine``. From the engine come the retriever (candidates), the response
synthesizer's QA prompt template (the generator's prompt text, rendered as the LLM renders it when serving) and its
LLM, a ``HuggingFaceLLM`` whose model becomes the DRO generator.

With ``selector.kind: retriever`` the engine's vector retriever is the trainable selector: its ``HuggingFaceEmbedding``
model is the query tower, each E-step re-retrieves from the index with the current query embeddings
(:meth:`LlamaIndexPipeline.search`), and the factory serves the run with
``index.as_retriever(embed_model=HuggingFaceEmbedding(model_name=run_dir / "selector"))``: the index's stored
document embeddings stay valid, as the document tower is frozen. With ``retriever.train`` (three units) the same query
model is trained next to an LM selector, and the factory serves ``run_dir / "retriever"`` as the embedding model, a
``DROSelectorPostprocessor`` and the fine-tuned generator.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from llama_index.core.llms import ChatMessage
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import MetadataMode, QueryBundle
from llama_index.llms.huggingface import HuggingFaceLLM

from dro_plugins.config import RunConfig
from dro_plugins.data.examples import Passage
from dro_plugins.data.labels import passage_has_answer
from dro_plugins.errors import PipelineError
from dro_plugins.modeling.generator import PromptEncoder, PromptRenderer
from dro_plugins.modeling.tokenization import encode_like_transformers_pipeline
from dro_plugins.build import export_generator
from dro_plugins.training.run_folder import RunPaths
from llama_index.postprocessor.dro.postprocessor import node_to_passage

QA_TEMPLATE = "response_synthesizer:text_qa_template"
# response synthesizers (by class) that call the LLM more than once per query, and their response_mode names;
# 'compact' (CompactAndRefine, the default) makes one call when the selected passages fit the context window
MANY_CALL_MODES = {"Refine": "refine", "TreeSummarize": "tree_summarize", "Accumulate": "accumulate", "CompactAndAccumulate": "compact_accumulate"}


def load_factory(spec: str):
    """The function named by ``"path/to/file.py:function"``.

    Raises:
        PipelineError: the file does not exist or does not define the function.
    """
    file, sep, name = spec.rpartition(":")
    path = Path(file)
    if not sep or not name:
        raise PipelineError(f"pipeline.llama_index: '{spec}' is not 'file.py:function', e.g. app.py:build_query_engine")
    if not path.is_file():
        raise PipelineError(f"pipeline.llama_index: {path} not found; name a Python file relative to the run config")
    module_name = f"dro_factory_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # pickling and dataclasses inside the app need the module registered
    try:
        module_spec.loader.exec_module(module)
    except SystemExit as exc:  # sys.exit() at import would end dro itself, silently
        raise PipelineError(f"pipeline.llama_index: importing {path} called sys.exit({exc.code}); guard it with if __name__ == '__main__'") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed to import: one line that says where
        raise PipelineError(f"pipeline.llama_index: importing {path} failed: {_user_error(exc)}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise PipelineError(f"pipeline.llama_index: {path} has no function '{name}'")
    return factory


def _user_error(exc: BaseException) -> str:
    """``Type: message`` of an exception from user code, with the file and line where it was raised."""
    where = ""
    if isinstance(exc, SyntaxError):
        where = f" ({exc.filename}:{exc.lineno})"
    elif exc.__traceback__ is not None:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f" ({frame.filename}:{frame.lineno})"
    message = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {message}{where}"


class LlamaIndexPipeline:
    """The trainable units of a LlamaIndex ``RetrieverQueryEngine`` built by a factory.

    Args:
        config: the run config (``pipeline.llama_index`` set).

    Attributes:
        engine: the query engine the factory returned.
        generator_model: the ``HuggingFaceLLM``'s model id or folder.

    Raises:
        PipelineError: the factory cannot be found, returns something other than a ``RetrieverQueryEngine``, or the
            engine's LLM is not a local Hugging Face model.
    """

    exported = "fine-tuned generator model (serve it with your factory's run_dir, see the example app)"
    export_notes: list[str] = []

    def __init__(self, config: RunConfig):
        self.spec = config.pipeline.llama_index
        factory = load_factory(self.spec)
        try:
            engine = factory()
        except SystemExit as exc:  # would end dro itself, silently
            raise PipelineError(f"pipeline.llama_index: your factory `{self.spec}` called sys.exit({exc.code}); return the query engine instead") from None
        except Exception as exc:  # noqa: BLE001 - the user's code raised: name the factory, keep their message
            raise PipelineError(f"pipeline.llama_index: your factory `{self.spec}` raised {_user_error(exc)}") from exc
        if not isinstance(engine, RetrieverQueryEngine):
            raise PipelineError(
                f"pipeline.llama_index: {self.spec} returned {type(engine).__name__}, not a RetrieverQueryEngine; "
                "return index.as_query_engine(...) or a RetrieverQueryEngine"
            )
        mode = MANY_CALL_MODES.get(type(engine._response_synthesizer).__name__)  # no public accessor in 0.14
        if mode is not None:
            raise PipelineError(
                f"pipeline.llama_index: response_mode '{mode}' calls the LLM more than once per query, while DRO trains "
                "the generator on one prompt holding the selected passages; use response_mode='compact' (the default) "
                "or 'simple_summarize'"
            )
        self.engine = engine
        self.retriever = engine.retriever
        self.template = engine.get_prompts().get(QA_TEMPLATE)
        if self.template is None:
            raise PipelineError(
                "pipeline.llama_index: the engine's response synthesizer has no text_qa_template; use a synthesizer "
                "that answers from the retrieved context (the default 'compact' does)"
            )
        self.llm = engine._response_synthesizer._llm  # no public accessor in llama-index-core 0.14
        if not isinstance(self.llm, HuggingFaceLLM):
            raise PipelineError(
                f"pipeline.llama_index: the engine's LLM ({type(self.llm).__name__}) is not a local HuggingFaceLLM, so DRO "
                "cannot train it; swap it for HuggingFaceLLM(model_name=...), or train the selector alone with a "
                "DROSelectorPostprocessor on a local stand-in generator (a separate run config without pipeline:)"
            )
        self.generator_model = self.llm.model_name
        self.max_new_tokens = self.llm.max_new_tokens  # the factory serves with it; DRO validates with it
        self.postprocessors = [type(p).__name__ for p in engine._node_postprocessors]  # no public accessor in 0.14
        if "DROSelectorPostprocessor" in self.postprocessors:
            raise PipelineError(
                f"pipeline.llama_index: the engine that {self.spec} returns already has a DROSelectorPostprocessor; return it "
                "without one when the factory is called with no arguments (DRO trains the selector that serving adds last)"
            )
        key = config.retriever_key
        instead = "selector.kind lm" if config.selector.kind == "retriever" else "no retriever.train"
        if key is not None and self.postprocessors:
            raise PipelineError(
                f"{key} trains on the retriever's own top nodes (its Plackett-Luce pool), but the engine's node "
                f"postprocessors ({', '.join(self.postprocessors)}) change them first; use {instead} (the LM selector "
                "then selects from their output)"
            )
        embed_model = getattr(self.retriever, "_embed_model", None)  # VectorIndexRetriever's; no public accessor
        self.query_encoder_model = getattr(embed_model, "model_name", None) if type(embed_model).__name__ == "HuggingFaceEmbedding" else None
        if key is not None and self.query_encoder_model is None:
            raise PipelineError(
                f"{key} trains the engine's query embedding model, but its retriever "
                f"({type(self.retriever).__name__}) does not embed queries with a HuggingFaceEmbedding; use "
                f"index.as_retriever() over a VectorStoreIndex with HuggingFaceEmbedding, or {instead}"
            )
        self._parts = self._settings(engine)  # before retrieve() sets the retriever's similarity_top_k
        self._nodes: dict = {}
        self._vectors: dict[str, list[float]] = {}  # node id -> the vector the index holds for it (search)

    def _settings(self, engine: RetrieverQueryEngine) -> dict[str, object]:
        llm = self.llm
        return {
            "graph": {
                "retriever": type(self.retriever).__name__,
                "node postprocessors": self.postprocessors,
                "response synthesizer": type(engine._response_synthesizer).__name__,
            },
            "prompt template": self.template.get_template(),
            "generator settings": {
                "model": llm.model_name, "max_new_tokens": llm.max_new_tokens, "generate_kwargs": llm.generate_kwargs,
                "system_prompt": llm.system_prompt, "query_wrapper_prompt": str(llm.query_wrapper_prompt),
                "is_chat_model": llm.is_chat_model, "context_window": llm.context_window,
            },
            "retrieval settings": {"similarity_top_k": getattr(self.retriever, "similarity_top_k", None), "embed_model": self.query_encoder_model},
        }

    def fingerprint_parts(self) -> dict[str, object]:
        """The engine as the factory built it, by part: retriever, node postprocessors and synthesizer classes, the
        QA template, the LLM's settings and the retriever's ``similarity_top_k`` and query embedding model."""
        return self._parts

    def components(self) -> list[str]:
        """The trainable units found in the engine, as ``role (Class)`` lines."""
        top_k = getattr(self.retriever, "similarity_top_k", None)
        encoder = [f"query encoder model {self.query_encoder_model}"] if self.query_encoder_model else []
        after = [f"node postprocessors {', '.join(self.postprocessors)} (applied to the candidates, before the DRO selector)"]
        return encoder + [
            f"retriever ({type(self.retriever).__name__}{f', similarity_top_k={top_k}' if top_k else ''})",
            *(after if self.postprocessors else []),
            f"QA template ({QA_TEMPLATE})",
            f"generator ({type(self.llm).__name__})",
            f"generator model {self.generator_model}",
        ]

    def retrieve(self, question: str, num_candidates: int) -> list[Passage]:
        """The engine's candidates for ``question`` as serving computes them (``RetrieverQueryEngine.retrieve``: the
        retriever's top ``num_candidates``, then the engine's node postprocessors), as passages, best first."""
        if hasattr(self.retriever, "similarity_top_k"):
            self.retriever.similarity_top_k = num_candidates
        nodes = self.engine.retrieve(QueryBundle(question))[:num_candidates]
        for node in nodes:
            self._nodes[node.node.node_id] = node.node
        return [node_to_passage(n.node) for n in nodes]

    @property
    def query_affixes(self) -> tuple[str, str]:
        """The text the embedding model puts before a query (its query instruction, a sentence-transformers prompt)."""
        encoder = getattr(getattr(self.retriever, "_embed_model", None), "_model", None)
        return (getattr(encoder, "prompts", None) or {}).get("query", "") or "", ""

    def search(self, queries, n: int) -> list[list[tuple[Passage, list[float]]]]:
        """The retriever's top ``n`` nodes for each query embedding ``[B, d]`` (``QueryBundle.embedding`` set, so the
        engine's own embedding model is not called for the query): the index a retriever selector re-retrieves its
        pools from.

        Vector stores such as FAISS return no node vectors, so each node's is computed once with the engine's embedding
        model on the text it indexed (``MetadataMode.EMBED``): the vector the store holds, which the selector then
        scores with.
        """
        self.retriever.similarity_top_k = n
        embed_model, hits = self.retriever._embed_model, []
        for query in queries.tolist():
            nodes = [scored.node for scored in self.retriever.retrieve(QueryBundle(query_str="", embedding=query))[:n]]
            missing = [node for node in nodes if node.node_id not in self._vectors]
            texts = [node.get_content(metadata_mode=MetadataMode.EMBED) for node in missing]
            self._vectors.update(zip([node.node_id for node in missing], embed_model.get_text_embedding_batch(texts) if texts else []))
            for node in nodes:
                self._nodes[node.node_id] = node
            hits.append([(node_to_passage(node), self._vectors[node.node_id]) for node in nodes])
        return hits

    def context(self, passages) -> str:
        """The synthesizer's ``context_str``: each node's LLM view (metadata and text), blank-line separated."""
        return "\n\n".join(
            self._nodes[p.id].get_content(MetadataMode.LLM) if p.id in self._nodes else p.text for p in passages
        )

    def prompt_renderer(self, tokenizer) -> PromptRenderer:
        """The QA template, then the LLM's own prompt wrapping (system prompt, query wrapper or chat template).

        This is the path of ``LLM.predict`` in the synthesizer: ``_get_messages`` + ``messages_to_prompt`` for chat
        LLMs, ``_get_prompt`` otherwise. It holds when the context fits in one LLM call (``compact`` packs all
        selected nodes into one prompt when they fit the context window).
        """
        llm = self.llm

        def render(question: str, passages) -> str:
            arguments = {"context_str": self.context(passages), "query_str": question}
            if llm.metadata.is_chat_model:
                messages: list[ChatMessage] = llm._get_messages(self.template, **arguments)
                return llm.messages_to_prompt(messages)
            return llm._get_prompt(self.template, **arguments)

        return render

    def prompt_encoder(self, tokenizer) -> PromptEncoder:
        """``tokenizer(text)``, as the generator component tokenizes the rendered prompt when serving."""
        return encode_like_transformers_pipeline(tokenizer)

    def served(self, run_dir: Path) -> dict[str, Callable[[str], tuple[str, list[Passage]]]]:
        """The factory's engine as built for training and as built for the run (``factory(run_dir=...)``), each as
        ``question -> (answer, passages given to the LLM)`` through ``query_engine.query`` (``dro evaluate --served``).

        Raises:
            PipelineError: the factory takes no ``run_dir`` (it cannot build the optimized engine).
        """
        factory = load_factory(self.spec)
        if "run_dir" not in inspect.signature(factory).parameters:
            raise PipelineError(
                f"pipeline.llama_index: {self.spec} takes no run_dir, so it cannot build the optimized engine; add a run_dir "
                "parameter that serves the run folder (see examples/llama_index_nq/app.py)"
            )

        def answerer(engine) -> Callable[[str], tuple[str, list[Passage]]]:
            def answer(question: str) -> tuple[str, list[Passage]]:
                response = engine.query(question)
                return str(response.response or ""), [node_to_passage(n.node) for n in response.source_nodes]

            return answer

        return {"original": answerer(factory()), "optimized": answerer(factory(run_dir=str(run_dir)))}

    def framework_scores(self, answers: list[str], gold: list[list[str]], passages: list[list[Passage]]) -> dict[str, float]:
        """LlamaIndex's retrieval metrics (``HitRate``, ``MRR``, as ``RetrieverEvaluator`` computes them) on the nodes
        given to the LLM; relevant: the nodes holding a gold answer. A question with none scores 0 (the metrics
        need at least one expected id)."""
        from llama_index.core.evaluation.retrieval.metrics import MRR, HitRate

        scores = {"llama_index hit rate": 0.0, "llama_index MRR": 0.0}
        for given, golds in zip(passages, gold):
            expected = [p.id for p in given if passage_has_answer(p, golds)]
            if expected:
                ids = [p.id for p in given]
                scores["llama_index hit rate"] += HitRate().compute(expected_ids=expected, retrieved_ids=ids).score / len(passages)
                scores["llama_index MRR"] += MRR().compute(expected_ids=expected, retrieved_ids=ids).score / len(passages)
        return scores

    def export(self, run_dir: Path) -> Path:
        """Merge the fine-tuned generator into ``<run_dir>/generator-model`` (a plain Hugging Face folder).

        With the selector already in ``run_dir``, that is all ``build_query_engine(run_dir=...)`` needs:
        ``HuggingFaceLLM(model_name=run_dir / "generator-model")`` and ``DROSelectorPostprocessor.from_pretrained(run_dir)``
        (LM selector) or ``HuggingFaceEmbedding(model_name=run_dir / "selector")`` as the retriever's query
        embedding model (retriever selector).
        """
        return export_generator(run_dir, RunPaths(Path(run_dir).resolve()).generator_model)
