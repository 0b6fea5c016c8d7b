"""Questions, candidates and corpora (:mod:`.examples`), answer labels (:mod:`.labels`), warm-up supervision
(:mod:`.supervision`) and synthetic tasks for tests (:mod:`.synthetic`).

``from dro_plugins.data import load_run_data`` (and the other names below) keeps working from before the layout of
folders.
"""

from dro_plugins.data.examples import Example, Passage, load_corpus, load_examples, load_run_data, parse_example, write_examples

__all__ = ["Example", "Passage", "load_corpus", "load_examples", "load_run_data", "parse_example", "write_examples"]
