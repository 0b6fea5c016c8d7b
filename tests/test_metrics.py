"""EM, F1 and recall@k against hand-computed values, answers compared after NFKC normalisation."""

import unicodedata

from dro_plugins.data.examples import Passage
from dro_plugins.data.labels import normalize_answer, passage_has_answer
from dro_plugins.evaluation.metrics import exact_match, f1_score, selection_recall


def test_squad_normalisation_and_scores():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("the Beatles", ["Beatles"]) == 1.0 and exact_match("Beatles band", ["Beatles"]) == 0.0
    # prediction "new york city" vs gold "new york": precision 2/3, recall 1 -> F1 = 2 * (2/3) / (5/3) = 0.8
    assert abs(f1_score("New York City", ["Los Angeles", "New York"]) - 0.8) < 1e-12
    assert f1_score("", ["x"]) == 0.0


def test_unicode_answers_compare_after_nfkc():
    composed, decomposed = "Jos\u00e9", unicodedata.normalize("NFD", "Jos\u00e9")
    assert composed != decomposed
    assert exact_match(decomposed, [composed]) == 1.0  # SQuAD's script would score 0
    assert exact_match("\uff11\uff19\uff18\uff14", ["1984"]) == 1.0  # full-width digits are their compatibility form
    assert passage_has_answer(Passage(id="1", title="", text=f"born in {decomposed} town"), [composed])


def test_recall_at_k_is_whether_any_selected_passage_holds_an_answer():
    hit, miss = Passage(id="1", title="", text="Paris is the capital"), Passage(id="2", title="", text="Lyon")
    assert selection_recall([miss, hit], ["paris"]) == 1.0 and selection_recall([miss], ["paris"]) == 0.0
