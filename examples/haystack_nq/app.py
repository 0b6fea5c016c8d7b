"""Answer a question with the DRO-optimized Haystack pipeline and show the passages its selector picked.

    python app.py "who sang i will always love you"

Run `dro optimize config.yaml` first (see README.md); it writes runs/haystack_nq/pipeline.yaml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import transformers
from haystack import Document, Pipeline
from haystack_integrations.components.rankers.dro import load_pipeline

from dro_plugins.data.examples import load_corpus

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "../../../shared/data/nq/corpus.jsonl"
EMPTY_ANSWER = (
    "(none: the generator wrote no text. A tiny model with random weights often ends its answer at once; "
    "train longer, or set the pipeline's generator to a real model, see README.md)"
)


def load_optimized(pipeline_yaml: Path, corpus: Path) -> Pipeline:
    """Load the optimized pipeline (default allowlist, no unsafe flag) and fill its in-memory store from the corpus.

    ``Pipeline.load`` reads the file from any folder; ``load_pipeline`` also re-bases its model paths when the run
    folder was moved.
    """
    pipeline = load_pipeline(pipeline_yaml)
    store = pipeline.get_component("retriever").document_store
    store.write_documents([Document(id=p.id, content=p.text, meta={"title": p.title}) for p in load_corpus(corpus)])
    return pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question")
    parser.add_argument("--pipeline", type=Path, default=Path("runs/haystack_nq/pipeline.yaml"))
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    pipeline = load_optimized(args.pipeline, args.corpus)
    # flat inputs go to every component with that input: retriever.query, dro_selector.query, prompt_builder.question
    result = pipeline.run({"query": args.question, "question": args.question}, include_outputs_from={"dro_selector"})
    answer = (result["llm"]["replies"][0].text or "").strip()
    print("answer:", answer or EMPTY_ANSWER)
    for rank, document in enumerate(result["dro_selector"]["documents"], start=1):
        print(f"[{rank}] {document.meta.get('title', '')}: {document.content[:100]}")


if __name__ == "__main__":
    main()
