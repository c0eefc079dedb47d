"""Perplexity and token accuracy of a model over a task's split, and a unigram baseline.

Perplexity is exp(mean NLL per non-padding target token), computed without z-loss and label
smoothing (DESIGN.md). Mixtures are evaluated task by task.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional

import gin
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
        batches = ds.as_numpy_iterator()
        if jax.process_count() > 1:
            # Hosts' shards of a finite split can hold different numbers of batches, and a host
            # that stops early would leave the others waiting in a collective: all take the minimum.
            from jax.experimental import multihost_utils
            batches = list(batches)
            counts = np.asarray(multihost_utils.process_allgather(np.int32(len(batches))))
            batches = batches[:int(counts.min())]
        for batch in batches:
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


# ------------------------------------------------------------------ text files and (input, target) scoring


@gin.configurable
def text_file_task(path: str = gin.REQUIRED, vocabulary: str = "byte", objective: str = "lm",
                   documents: str = "line", text_field: str = "text") -> str:
    """Register a throwaway corpus whose validation split is the whole file; return its task name.

    Lets `eval` read a text or JSONL file named on the command line (gin/runs/eval_text.gin)
    without registering anything by hand. `vocabulary` is a registered name ("byte", "spm") or a
    SentencePiece .model file (e.g. the spiece.model that came with a Hugging Face checkpoint).
    """
    import hashlib

    from t5x_like.data import corpus as corpus_lib
    from t5x_like.data import vocabularies as vocab_lib

    if not os.path.isfile(path):
        raise FileNotFoundError(f"evaluation text file {path!r} does not exist")
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    if vocabulary.endswith(".model"):
        if not os.path.isfile(vocabulary):
            raise FileNotFoundError(f"SentencePiece model {vocabulary!r} does not exist")
        vocab_name = "file" + hashlib.sha1(os.path.abspath(vocabulary).encode()).hexdigest()[:12]
        if vocab_name not in vocab_lib.vocabulary_names():
            vocab_lib.register_vocabulary(vocab_name, vocab_lib.vocabulary_from_file(vocabulary))
    else:
        vocab_name = vocabulary
    name = f"evalfile{digest}"
    kind = "jsonl_glob" if path.endswith((".jsonl", ".json")) else "text_glob"
    extra = {"text_field": text_field} if kind == "jsonl_glob" else {"documents": documents}
    corpus_lib.register_corpus(name, **{kind: {"validation": [os.path.abspath(path)]}}, overwrite=True, **extra)
    return tasks_lib.task_name(name, objective, vocab_name)


def score_pairs(model, variables, inputs, targets, batch_size: int = 8) -> np.ndarray:
    """Log-likelihood of each target token sequence given its input (token id lists, no padding).

    Encoder-decoder: inputs go to the encoder, targets are decoded after the start id 0.
    Decoder-only: the model reads inputs then targets; only target tokens are scored (an empty
    input scores the target from a leading 0, the BOS of this project's LM tasks).
    """
    from t5x_like.models.base import EncoderDecoderModel

    enc_dec = isinstance(model, EncoderDecoderModel)
    fn = jax.jit(lambda v, b: model.compute_logits(v, b))
    out = []
    for start in range(0, len(targets), batch_size):
        ins, tgts = inputs[start:start + batch_size], targets[start:start + batch_size]
        rows = len(tgts)
        if enc_dec:
            enc_len = max(1, max(len(x) for x in ins))
            dec_len = max(1, max(len(t) for t in tgts))
            enc = np.zeros((rows, enc_len), np.int32)
            dec_in = np.zeros((rows, dec_len), np.int32)
            dec_tgt = np.zeros((rows, dec_len), np.int32)
            weights = np.zeros((rows, dec_len), np.float32)
            for i, (x, t) in enumerate(zip(ins, tgts)):
                enc[i, :len(x)] = x
                dec_tgt[i, :len(t)] = t
                dec_in[i, 1:len(t)] = t[:-1]
                weights[i, :len(t)] = 1
            batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in, "decoder_target_tokens": dec_tgt}
        else:
            seqs = [(list(x) if len(x) else [0]) + list(t) for x, t in zip(ins, tgts)]
            length = max(len(s) for s in seqs) - 1
            dec_in = np.zeros((rows, length), np.int32)
            dec_tgt = np.zeros((rows, length), np.int32)
            weights = np.zeros((rows, length), np.float32)
            for i, (s, t) in enumerate(zip(seqs, tgts)):
                dec_in[i, :len(s) - 1] = s[:-1]
                dec_tgt[i, :len(s) - 1] = s[1:]
                weights[i, len(s) - 1 - len(t):len(s) - 1] = 1
            batch = {"decoder_input_tokens": dec_in}
        logp = jax.nn.log_softmax(np.asarray(fn(variables, batch), np.float32), axis=-1)
        picked = np.take_along_axis(np.asarray(logp), dec_tgt[..., None], axis=-1)[..., 0]
        out.extend(np.sum(picked * weights, axis=1).tolist())
    return np.asarray(out, np.float64)
