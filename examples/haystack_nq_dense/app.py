"""Answer a question with the DRO-optimized dense Haystack pipeline and show the passages its retriever returned.

    python app.py "who sang i will always love you"

Run `dro optimize config.yaml` first (see README.md); it writes runs/haystack_nq_dense/pipeline.yaml. The document
store is filled with embeddings of the frozen document tower (the original models/retriever), kept in storage/ after
the first run; only the query side changed, so they stay valid.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import transformers
from haystack import Document, Pipeline
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack_integrations.components.rankers.dro import load_pipeline

from dro_plugins.data.examples import load_corpus

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "../../../shared/data/nq/corpus.jsonl"
STORAGE = HERE / "storage/documents.json"
EMPTY_ANSWER = (
    "(none: the generator wrote no text. A tiny model with random weights often ends its answer at once; "
    "train longer, or set the pipeline's generator to a real model, see README.md)"
)


def embedded_documents(corpus: Path, embedder_yaml: Path, storage: Path = STORAGE) -> InMemoryDocumentStore:
    """The corpus embedded by the document tower, loaded from ``storage`` when saved there.

    ``embedder_yaml`` is the run's ``document-embedder.yaml``: the document embedder exactly as the run embedded
    its store (title and text, normalised), which the fine-tuned query encoder was trained against.
    """
    if storage.is_file():
        return InMemoryDocumentStore.load_from_disk(str(storage))
    with embedder_yaml.open() as fp:
        indexing = Pipeline.load(fp)
    documents = [Document(id=p.id, content=p.text, meta={"title": p.title}) for p in load_corpus(corpus)]
    store = InMemoryDocumentStore()
    store.write_documents(indexing.run({"document_embedder": {"documents": documents}})["document_embedder"]["documents"])
    storage.parent.mkdir(parents=True, exist_ok=True)
    store.save_to_disk(str(storage))
    return store


def load_optimized(pipeline_yaml: Path, corpus: Path) -> Pipeline:
    """Load the optimized pipeline (default allowlist, no unsafe flag) and fill its store with the embedded corpus."""
    pipeline = load_pipeline(pipeline_yaml)
    documents = embedded_documents(corpus, pipeline_yaml.parent / "document-embedder.yaml").filter_documents()
    pipeline.get_component("retriever").document_store.write_documents(documents)
    return pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question")
    parser.add_argument("--pipeline", type=Path, default=Path("runs/haystack_nq_dense/pipeline.yaml"))
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    pipeline = load_optimized(args.pipeline, args.corpus)
    inputs = {"text_embedder": {"text": args.question}, "prompt_builder": {"question": args.question}}
    shown = "retriever"  # the passages the prompt reads: the retriever's, or the DRO selector's (three-unit run)
    if "dro_selector" in dict(pipeline.walk()):
        inputs["dro_selector"] = {"query": args.question}
        shown = "dro_selector"
    result = pipeline.run(inputs, include_outputs_from={shown})
    answer = (result["llm"]["replies"][0].text or "").strip()
    print("answer:", answer or EMPTY_ANSWER)
    for rank, document in enumerate(result[shown]["documents"], start=1):
        print(f"[{rank}] {document.meta.get('title', '')}: {document.content[:100]}")


if __name__ == "__main__":
    main()
