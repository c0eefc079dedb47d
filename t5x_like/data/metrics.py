"""Metric functions for seqio tasks, in seqio's convention: `metric_fn(targets, predictions) -> dict`.

A task names them in `metric_fns=[...]`; the `infer_eval` mode (and `train.infer_eval_every`)
decodes each example, applies the task's `postprocess_fn` to predictions and targets, and calls
them with the postprocessed lists (inference/infer_eval.py). Every value is a percentage (0..100),
as in T5's `t5.evaluation.metrics`. They live at the data level so that a module defining tasks can
use them without importing anything from training or inference.

- `exact_match`: the percentage of predictions equal to their target (strings compared as they
  are; normalise in the task's `postprocess_fn`).
- `accuracy`: the same for any labels a `postprocess_fn` returns (ints, class names), as T5's
  `accuracy` (sklearn's accuracy_score); reported as "accuracy".
- `bleu`: corpus BLEU of sacrebleu (`sacrebleu.corpus_bleu`) with T5's settings: tokenize="intl"
  (Unicode-aware punctuation splitting, T5's choice; sacrebleu's own default is "13a"), and
  sacrebleu's defaults otherwise: exponential smoothing, case-sensitive, no effective order,
  4-grams. Several references per example: pass each target as a list (all the same length).
- `chrf`: corpus chrF of sacrebleu (`sacrebleu.corpus_chrf`) with its defaults: character 6-grams,
  no word n-grams (chrF, not chrF++), beta=2, whitespace removed.
- `rouge`: rouge-score's rouge1 / rouge2 / rougeLsum F-measures with the Porter stemmer, as T5
  computes them (" . " becomes " .\\n" so rougeLsum sees sentences), averaged over examples (the
  mean; T5 reports rouge_score's BootstrapAggregator "mid", a resampled estimate of this same mean
  that varies with the random seed), times 100.
"""

from __future__ import annotations

from typing import Sequence

ROUGE_KEYS = ("rouge1", "rouge2", "rougeLsum")


def _check(targets: Sequence, predictions: Sequence, name: str) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"{name}: {len(targets)} targets but {len(predictions)} predictions")
    if not len(targets):
        raise ValueError(f"{name}: no examples to score")


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict:
    """{"exact_match": percentage of predictions identical to their target}."""
    _check(targets, predictions, "exact_match")
    return {"exact_match": 100.0 * sum(t == p for t, p in zip(targets, predictions)) / len(targets)}


def accuracy(targets: Sequence, predictions: Sequence) -> dict:
    """{"accuracy": percentage of predicted labels equal to their target label}."""
    _check(targets, predictions, "accuracy")
    return {"accuracy": 100.0 * sum(t == p for t, p in zip(targets, predictions)) / len(targets)}


def _reference_streams(targets: Sequence, name: str) -> list[list[str]]:
    """sacrebleu's references: one list per reference position, each as long as the predictions."""
    if not all(isinstance(t, (list, tuple)) for t in targets):
        return [list(targets)]
    counts = {len(t) for t in targets}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"{name}: every example needs the same number (>= 1) of references; got {sorted(counts)}")
    return [list(refs) for refs in zip(*targets)]


def bleu(targets: Sequence, predictions: Sequence[str], tokenize: str = "intl") -> dict:
    """{"bleu": sacrebleu corpus BLEU} (see the module docstring for the settings)."""
    import sacrebleu

    _check(targets, predictions, "bleu")
    score = sacrebleu.corpus_bleu(list(predictions), _reference_streams(targets, "bleu"), smooth_method="exp",
                                  lowercase=False, tokenize=tokenize, use_effective_order=False)
    return {"bleu": float(score.score)}


def chrf(targets: Sequence, predictions: Sequence[str]) -> dict:
    """{"chrf": sacrebleu corpus chrF} with sacrebleu's defaults."""
    import sacrebleu

    _check(targets, predictions, "chrf")
    return {"chrf": float(sacrebleu.corpus_chrf(list(predictions), _reference_streams(targets, "chrf")).score)}


def _sentences(summary: str) -> str:
    return summary.replace(" . ", " .\n")  # T5: newlines between sentences for rougeLsum


def rouge(targets: Sequence[str], predictions: Sequence[str], score_keys: Sequence[str] = ROUGE_KEYS,
          use_stemmer: bool = True) -> dict:
    """{key: mean F-measure x 100} for each rouge-score type in `score_keys`."""
    from rouge_score import rouge_scorer

    _check(targets, predictions, "rouge")
    scorer = rouge_scorer.RougeScorer(rouge_types=list(score_keys), use_stemmer=use_stemmer)
    totals = dict.fromkeys(score_keys, 0.0)
    for target, prediction in zip(targets, predictions):
        scores = scorer.score(target=_sentences(target), prediction=_sentences(prediction))
        for key in score_keys:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * total / len(targets) for key, total in totals.items()}
