"""Perplexity and token accuracy of a model over a task's split, a unigram baseline, and scores.

Perplexity is exp(mean NLL per non-padding target token), computed without z-loss and label
smoothing (DESIGN.md). Mixtures are evaluated task by task. Everything model-specific (which
features are targets, how a pair becomes a batch) comes from the model contract (models/base.py),
so this module sits below training and serves every family.
"""

from __future__ import annotations

import hashlib
import os
from typing import Mapping, Optional

import gin
import jax
import numpy as np
import seqio

from t5x_like import partitioning
from t5x_like.data import iterators as data_iterators
from t5x_like.data import tasks as tasks_lib
from t5x_like.objectives import EVAL_SUM_KEYS, summarize


def task_names_of(mixture_or_task_name: str) -> list[str]:
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    if isinstance(provider, seqio.Mixture):
        return [t.name for t in provider.tasks]
    return [provider.name]


class Evaluator:
    """Evaluates params on a fixed set of batches per task (the same batches every call)."""

    def __init__(self, model, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                 batch_size: int, mesh, param_shardings=None, split: str = "validation",
                 max_batches: Optional[int] = 20, seed: int = 0):
        self.model, self.mesh, self.split = model, mesh, split
        self.max_batches = max_batches
        self.lengths = dict(task_feature_lengths)
        self.host_batch = batch_size // jax.process_count()
        self.tasks = task_names_of(mixture_or_task_name)
        # A mixture's tasks are read with the mixture's objective (its feature converter), so a
        # prefix-LM task inside an encoder-decoder mixture yields encoder-decoder batches.
        self.objective = tasks_lib.info(mixture_or_task_name).objective
        self.seed = seed
        jit_kwargs = {}
        if param_shardings is not None:
            jit_kwargs["in_shardings"] = (param_shardings, None)
        self._step = jax.jit(model.eval_sums, **jit_kwargs)

    def _batches(self, task: str):
        ds = data_iterators.get_dataset(task, self.lengths, split=self.split, batch_size=self.host_batch,
                                        shuffle=False, seed=self.seed, num_epochs=1, objective=self.objective)
        if self.max_batches is not None:
            ds = ds.take(self.max_batches)
        batches = ds.as_numpy_iterator()
        if jax.process_count() > 1:
            # Hosts' shards of a finite split can hold different numbers of batches, and a host
            # that stops early would leave the others waiting in a collective: all take the minimum.
            from jax.experimental import multihost_utils
            batches = list(batches)
            counts = np.asarray(multihost_utils.process_allgather(np.int32(len(batches))))
            batches = batches[:int(counts.min())]
        for batch in batches:
            yield partitioning.to_global_batch(batch, self.mesh)

    def evaluate(self, params) -> dict[str, dict]:
        """{task: {nll, perplexity, accuracy, tokens}}, plus "all" pooling every task's tokens."""
        results, pooled = {}, dict.fromkeys(EVAL_SUM_KEYS, 0.0)
        with partitioning.activation_context(self.mesh):
            for task in self.tasks:
                sums = dict.fromkeys(EVAL_SUM_KEYS, 0.0)
                for batch in self._batches(task):
                    out = jax.device_get(self._step(params, batch))
                    for k in sums:
                        sums[k] += float(out[k])
                if sums["tokens"] == 0:
                    raise ValueError(f"evaluation of {task!r} split {self.split!r} saw no target tokens; "
                                     "the split is empty or shorter than one batch: lower the batch size")
                results[task] = summarize(sums)
                for k in pooled:
                    pooled[k] += sums[k]
        if len(self.tasks) > 1:
            results["all"] = summarize(pooled)
        return results


def unigram_baseline(model, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                     batch_size: int = 32, train_batches: int = 200, eval_batches: Optional[int] = 20,
                     seed: int = 0) -> dict:
    """Perplexity of target-token frequencies counted on the train split (add-one smoothed),
    scored on the same validation batches an Evaluator with these settings sees."""
    vocab = model.config.vocab_size
    counts = np.ones(vocab, np.float64)
    train = data_iterators.get_dataset(mixture_or_task_name, task_feature_lengths, split="train",
                                       batch_size=batch_size, shuffle=False, seed=seed, num_epochs=1)
    for batch in train.take(train_batches).as_numpy_iterator():
        targets, weights = model.targets_and_weights(batch)
        np.add.at(counts, np.asarray(targets)[np.asarray(weights) > 0], 1)
    logp = np.log(counts / counts.sum())
    sums = dict.fromkeys(EVAL_SUM_KEYS, 0.0)
    best = int(np.argmax(counts))
    objective = tasks_lib.info(mixture_or_task_name).objective
    for task in task_names_of(mixture_or_task_name):
        ds = data_iterators.get_dataset(task, task_feature_lengths, split="validation", batch_size=batch_size,
                                        shuffle=False, seed=seed, num_epochs=1, objective=objective)
        if eval_batches is not None:
            ds = ds.take(eval_batches)
        for batch in ds.as_numpy_iterator():
            targets, weights = (np.asarray(x) for x in model.targets_and_weights(batch))
            sums["nll_sum"] -= float(np.sum(logp[targets] * weights))
            sums["tokens"] += float(np.sum(weights))
            sums["correct"] += float(np.sum((targets == best) * weights))
    return summarize(sums)


def check_task(mixture_or_task_name: str) -> None:
    """One clear error for an unknown task name, before anything is built."""
    tasks_lib.info(mixture_or_task_name)


# ------------------------------------------------------------------ text files and (input, target) scoring


@gin.configurable
def text_file_task(path: str = gin.REQUIRED, vocabulary: str = "byte", objective: str = "lm",
                   documents: str = "line", text_field: str = "text") -> str:
    """Register a throwaway corpus whose validation split is the whole file; return its task name.

    Lets `eval` read a text or JSONL file named on the command line (gin/runs/eval_text.gin)
    without registering anything by hand. `vocabulary` is a registered name ("byte", "spm") or a
    SentencePiece .model file (e.g. the spiece.model that came with a Hugging Face checkpoint).
    """
    from t5x_like.data import corpus as corpus_lib
    from t5x_like.data import vocabularies as vocab_lib

    if not os.path.isfile(path):
        raise FileNotFoundError(f"evaluation text file {path!r} does not exist")
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    vocab_name = vocab_lib.vocabulary_name(vocabulary)
    name = f"evalfile{digest}"
    kind = "jsonl_glob" if path.endswith((".jsonl", ".json")) else "text_glob"
    extra = {"text_field": text_field} if kind == "jsonl_glob" else {"documents": documents}
    corpus_lib.register_corpus(name, **{kind: {"validation": [os.path.abspath(path)]}}, overwrite=True, **extra)
    return tasks_lib.task_name(name, objective, vocab_name)


def score_pairs(model, variables, inputs, targets, batch_size: int = 8) -> np.ndarray:
    """Log-likelihood of each target token sequence given its input (token id lists, no padding),
    with the pairs laid out as the model reads them (`scoring_batch`)."""
    fn = jax.jit(lambda params, batch: model.score(params, batch))
    out = []
    for start in range(0, len(targets), batch_size):
        batch = model.scoring_batch(inputs[start:start + batch_size], targets[start:start + batch_size])
        out.extend(np.asarray(fn(variables["params"], batch), np.float64).tolist())
    return np.asarray(out, np.float64)
