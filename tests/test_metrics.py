import pytest

from mu.data.tasks import NO_ANSWER, Example
from mu.errors import MuError
from mu.eval.metrics import (codexglue_bleu4, compute_metrics, exact_score, f1_score, normalize_answer,
                             rouge_metrics, sacrebleu_score, squad_v2_metrics)


def test_official_squad_normalisation():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("Theatre anthem") == "theatre anthem"  # articles only as whole words
    assert normalize_answer("A.") == ""
    assert normalize_answer("1,000 km's") == "1000 kms"
    assert exact_score("Denver Broncos", "the denver broncos.") == 1


def test_squad_f1_partial_overlap_and_empty_cases():
    assert f1_score("Denver Broncos", "the Broncos") == pytest.approx(2 / 3)
    assert f1_score("x y z", "y z w v") == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
    assert f1_score("", "") == 1.0 and f1_score("", "Paris") == 0.0 and f1_score("Paris", "") == 0.0
    assert f1_score("x x y", "x y y") == pytest.approx(2 / 3)  # token counts are clipped


def test_squad_v2_max_over_references_and_no_answer():
    refs = {"a": ["Denver Broncos", "Broncos"], "b": [], "c": [], "d": ["Paris"], "e": ["the"]}
    preds = {"a": "broncos", "b": NO_ANSWER, "c": "Paris", "d": "Unanswerable.", "e": ""}
    m = squad_v2_metrics(preds, refs)
    # a: exact via the 2nd reference; b: no-answer phrase == ""; c: answered an unanswerable question;
    # d: said no answer to an answerable one; e: a gold that normalises to "" counts as no answer (official)
    assert m["total"] == 5 and m["exact"] == pytest.approx(60.0) and m["f1"] == pytest.approx(60.0)
    assert (m["HasAns_total"], m["HasAns_exact"]) == (2, 50.0)
    assert (m["NoAns_total"], m["NoAns_exact"]) == (3, pytest.approx(200 / 3))


def test_rouge_known_values():
    m = rouge_metrics(["the cat sat on the mat"], [["the cat was on the mat"]])
    assert m["rouge1"] == pytest.approx(500 / 6) and m["rouge2"] == pytest.approx(60.0)
    assert m["rougeL"] == pytest.approx(500 / 6)
    assert rouge_metrics(["He runs fast."], [["he running fast"]])["rouge1"] == pytest.approx(100.0)  # stemming
    two = rouge_metrics(["It rained. Then it snowed."], [["Then it snowed. It rained."]])
    assert two["rougeLsum"] == pytest.approx(100.0) and two["rougeL"] < 100.0  # Lsum works per sentence
    assert rouge_metrics(["x"], [["a", "x"]])["rouge1"] == pytest.approx(100.0)  # best reference


def test_bleu_known_values():
    assert sacrebleu_score(["a b c d e"], [["a b c d f"]]) == pytest.approx(100 * 0.2 ** 0.25, abs=1e-6)
    assert sacrebleu_score(["the cat sat down", "hi"], [["the cat sat down", "hi"]]) == pytest.approx(100.0)
    # CodeXGLUE smoothed BLEU-4: p1 = 2/3, p2..p4 add-one smoothed: 1/3, 1/2, 1/1; no brevity penalty
    assert codexglue_bleu4(["returns the value"], [["returns a value"]]) == pytest.approx(100 * (1 / 9) ** 0.25)
    assert codexglue_bleu4(["Returns the value."], [["returns the value ."]]) == pytest.approx(100.0)
    short = codexglue_bleu4(["returns"], [["returns the value of x"]])  # brevity penalty exp(1 - 6/2)
    assert short == pytest.approx(100 * (1 * (1 / 1) * 1 * 1) ** 0.25 * 2.718281828 ** (1 - 6 / 2), rel=1e-6)
    # a quirk of the definition, kept for comparability: an empty prediction scores exp(-reference length)
    assert codexglue_bleu4([""], [["two words"]]) == pytest.approx(100 * 2.718281828 ** -2, rel=1e-6)


def test_compute_metrics_per_task_and_missing_ids():
    ex = [Example("1", "s", "Paris", ["Paris"]), Example("2", "s", NO_ANSWER, [])]
    m = compute_metrics("squad_v2", ex, {"1": "paris", "2": "unanswerable"})
    assert m["exact"] == 100.0 and m["f1"] == 100.0
    s = compute_metrics("seq2seq", ex[:1], {"1": "Paris"})
    assert {"exact", "f1", "rougeL", "bleu", "total"} <= set(s)
    c = compute_metrics("code2text", ex[:1], {"1": "Paris"})
    assert c["bleu4"] == pytest.approx(100.0)
    x = compute_metrics("xsum", ex[:1], {"1": "London"})
    assert x["rouge1"] == 0.0 and x["total"] == 1
    with pytest.raises(MuError, match="no prediction for 1 of 2 examples"):
        compute_metrics("squad_v2", ex, {"1": "Paris"})
