"""Perplexity and token accuracy of a model over a task's split, and a unigram baseline.

Perplexity is exp(mean NLL per non-padding target token), computed without z-loss and label
smoothing (DESIGN.md). Mixtures are evaluated task by task.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import jax
import numpy as np
import seqio

from t5x_like import partitioning
from t5x_like.data import iterators as data_iterators
from t5x_like.data import tasks as tasks_lib
from t5x_like.training import steps
from t5x_like.training.losses import targets_and_weights


def summarize(sums: Mapping[str, float]) -> dict:
    tokens = max(float(sums["tokens"]), 1.0)
    nll = float(sums["nll_sum"]) / tokens
    return {"nll": nll, "perplexity": math.exp(min(nll, 700.0)), "accuracy": float(sums["correct"]) / tokens,
            "tokens": float(sums["tokens"])}


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
        self._step = steps.make_eval_step(model, **jit_kwargs)

    def _batches(self, task: str):
        ds = data_iterators.get_dataset(task, self.lengths, split=self.split, batch_size=self.host_batch,
                                        shuffle=False, seed=self.seed, num_epochs=1, objective=self.objective)
        if self.max_batches is not None:
            ds = ds.take(self.max_batches)
        for batch in ds.as_numpy_iterator():
            yield data_iterators.to_global_batch(batch, self.mesh)

    def evaluate(self, params) -> dict[str, dict]:
        """{task: {nll, perplexity, accuracy, tokens}}, plus "all" pooling every task's tokens."""
        results, pooled = {}, {"nll_sum": 0.0, "tokens": 0.0, "correct": 0.0}
        with partitioning.activation_context(self.mesh):
            for task in self.tasks:
                sums = {"nll_sum": 0.0, "tokens": 0.0, "correct": 0.0}
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
        targets, weights = targets_and_weights(model, batch)
        np.add.at(counts, np.asarray(targets)[np.asarray(weights) > 0], 1)
    logp = np.log(counts / counts.sum())
    sums = {"nll_sum": 0.0, "tokens": 0.0, "correct": 0.0}
    best = int(np.argmax(counts))
    objective = tasks_lib.info(mixture_or_task_name).objective
    for task in task_names_of(mixture_or_task_name):
        ds = data_iterators.get_dataset(task, task_feature_lengths, split="validation", batch_size=batch_size,
                                        shuffle=False, seed=seed, num_epochs=1, objective=objective)
        if eval_batches is not None:
            ds = ds.take(eval_batches)
        for batch in ds.as_numpy_iterator():
            targets, weights = (np.asarray(x) for x in targets_and_weights(model, batch))
            sums["nll_sum"] -= float(np.sum(logp[targets] * weights))
            sums["tokens"] += float(np.sum(weights))
            sums["correct"] += float(np.sum((targets == best) * weights))
    return summarize(sums)


def check_task(mixture_or_task_name: str) -> None:
    """One clear error for an unknown task name, before anything is built."""
    tasks_lib.info(mixture_or_task_name)
