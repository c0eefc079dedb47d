"""Task metric functions (data/metrics.py) against hand counts and direct sacrebleu / rouge-score calls."""

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from t5x_like.data import metrics

TARGETS = ["the cat sat on the mat today", "a quick brown fox jumps over the dog", "hello there . general kenobi .",
           "stemming runs running runner"]
PREDICTIONS = ["the cat sat on a mat today", "a quick brown fox jumps over the dog", "hello . general kenobi .",
               "stem run running runners"]


def test_exact_match_and_accuracy_by_hand():
    assert metrics.exact_match(TARGETS, PREDICTIONS) == {"exact_match": 25.0}  # only the second is identical
    assert metrics.exact_match(["a", "b"], ["a", "b"]) == {"exact_match": 100.0}
    assert metrics.accuracy([1, 0, 2, 2, 1], [1, 0, 1, 2, 0]) == {"accuracy": 60.0}
    with pytest.raises(ValueError, match="2 targets but 1 predictions"):
        metrics.exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no examples"):
        metrics.accuracy([], [])


def test_bleu_and_chrf_are_sacrebleu_corpus_scores():
    want = sacrebleu.corpus_bleu(PREDICTIONS, [TARGETS], tokenize="intl").score
    assert metrics.bleu(TARGETS, PREDICTIONS) == {"bleu": pytest.approx(want)}
    assert 0 < want < 100
    assert metrics.bleu(TARGETS, PREDICTIONS, tokenize="13a")["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(PREDICTIONS, [TARGETS]).score)
    assert metrics.bleu(TARGETS, TARGETS)["bleu"] == pytest.approx(100.0)
    # Several references per example: one sacrebleu reference stream per position.
    second = ["the cat sat on a mat today", "x", "y", "z"]
    multi = metrics.bleu([[t, s] for t, s in zip(TARGETS, second)], PREDICTIONS)["bleu"]
    assert multi == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [TARGETS, second], tokenize="intl").score)
    assert multi > want
    want = sacrebleu.corpus_chrf(PREDICTIONS, [TARGETS]).score
    assert metrics.chrf(TARGETS, PREDICTIONS) == {"chrf": pytest.approx(want)} and 0 < want < 100


def test_rouge_is_the_mean_f_measure_with_stemming():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    scores = [scorer.score(t.replace(" . ", " .\n"), p.replace(" . ", " .\n")) for t, p in zip(TARGETS, PREDICTIONS)]
    got = metrics.rouge(TARGETS, PREDICTIONS)
    assert set(got) == {"rouge1", "rouge2", "rougeLsum"}
    for key in got:
        assert got[key] == pytest.approx(100 * sum(s[key].fmeasure for s in scores) / len(scores))
    # Stemming: "runs"/"running"/"runner" vs "run"/"running"/"runners" share stems.
    assert metrics.rouge(TARGETS[3:], PREDICTIONS[3:])["rouge1"] > metrics.rouge(
        TARGETS[3:], PREDICTIONS[3:], use_stemmer=False)["rouge1"]
    assert metrics.rouge(TARGETS, TARGETS) == {k: pytest.approx(100.0) for k in got}
