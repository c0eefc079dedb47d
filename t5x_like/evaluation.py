"""Perplexity and token accuracy of a model over a task's split, a unigram baseline, and scores.

Perplexity is exp(mean NLL per non-padding target token), computed without z-loss and label
smoothing (DESIGN.md). Mixtures are evaluated task by task. Everything model-specific (which
features are targets, how a pair becomes a batch) comes from the model contract (models/base.py),
so this module sits below training and serves every family.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Iterable, Iterator, Mapping, Optional

import gin
import jax
import numpy as np
import seqio

from t5x_like import partitioning
from t5x_like.data import iterators as data_iterators
from t5x_like.data import tasks as tasks_lib
from t5x_like.errors import UserError
from t5x_like.objectives import EVAL_SUM_KEYS, summarize


def task_names_of(mixture_or_task_name: str) -> list[str]:
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    if isinstance(provider, seqio.Mixture):
        return [t.name for t in provider.tasks]
    return [provider.name]


def pad_to_longest_host(batches: Iterable[dict], zero_batch: dict,
                        allgather: Callable[[bool], Iterable]) -> Iterator[dict]:
    """This host's batches, then all-zero padding batches until every host has run out.

    Hosts' shards of a finite split can hold different numbers of batches, and every step is a
    collective, so all hosts must take the same number of steps: each step, `allgather(has_batch)`
    (every host's flag) says whether any host still has one. Padding rows weigh zero, so the
    result counts each host's examples exactly once (no host's tail is cut to the shortest).
    """
    batches = iter(batches)
    while True:
        batch = next(batches, None)
        if not any(bool(x) for x in allgather(batch is not None)):
            return
        yield zero_batch if batch is None else batch


def _process_allgather(flag: bool):
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.int32(flag))).reshape(-1)


def _zero_batch(element_spec) -> dict:
    return {k: np.zeros(spec.shape, spec.dtype.as_numpy_dtype) for k, spec in element_spec.items()}


def _sum_over_hosts(x: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.asarray(x, np.float64))).sum(axis=0)


class Evaluator:
    """Evaluates params on a fixed set of batches per task (the same batches every call).

    With `max_batches=None` every target token of the split counts exactly once: the final
    partial batch is padded with all-zero (zero-weight) rows rather than dropped, and hosts with
    fewer batches feed padding batches until every host is done. Batch shapes never change, so the
    step compiles once. `sums_fn(params, batch)` replaces the model's `eval_sums` (a loss's own
    evaluation: DPO's held-out rewards); `add_features(batch)` adds features to each global batch
    (a frozen reference model's log-probabilities).
    """

    def __init__(self, model, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                 batch_size: int, mesh, param_shardings=None, split: str = "validation",
                 max_batches: Optional[int] = 20, seed: int = 0, sums_fn=None, add_features=None):
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
        self._step = jax.jit(sums_fn or model.eval_sums, **jit_kwargs)
        self._add_features = add_features

    def _batches(self, task: str):
        ds = data_iterators.get_dataset(task, self.lengths, split=self.split, batch_size=self.host_batch,
                                        shuffle=False, seed=self.seed, num_epochs=1, objective=self.objective,
                                        drop_remainder=False, model=self.model)
        if self.max_batches is not None:
            ds = ds.take(self.max_batches)
        batches = ds.as_numpy_iterator()
        if jax.process_count() > 1:
            batches = pad_to_longest_host(batches, _zero_batch(ds.element_spec), _process_allgather)
        for batch in batches:
            batch = partitioning.to_global_batch(batch, self.mesh)
            yield batch if self._add_features is None else self._add_features(batch)

    def evaluate(self, params) -> dict[str, dict]:
        """{task: {nll, perplexity, accuracy, tokens}}, plus "all" pooling every task's tokens. Every
        sum the model's `eval_sums` returns is added up and summarized (objectives/metrics.py), so a
        model may report more (a regression head: squared error)."""
        results, pooled = {}, {}
        with partitioning.activation_context(self.mesh):
            for task in self.tasks:
                sums = {}
                for batch in self._batches(task):
                    out = jax.device_get(self._step(params, batch))
                    for k, v in out.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                if sums.get("tokens", 0.0) == 0:
                    raise UserError(f"evaluation of {task!r} split {self.split!r} saw no target tokens; "
                                     "the split holds no text for this objective")
                results[task] = summarize(sums)
                for k, v in sums.items():
                    pooled[k] = pooled.get(k, 0.0) + v
        if len(self.tasks) > 1:
            results["all"] = summarize(pooled)
        return results


def unigram_baseline(model, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                     batch_size: int = 32, train_batches: int = 200, eval_batches: Optional[int] = 20,
                     seed: int = 0) -> dict:
    """Perplexity of target-token frequencies counted on the train split (add-one smoothed),
    scored on the same validation batches an Evaluator with these settings sees (every token of
    the split with `eval_batches=None`; each host its shard, the counts and sums added up).
    `batch_size` is per host."""
    vocab = model.config.vocab_size
    counts = np.zeros(vocab, np.float64)
    train = data_iterators.get_dataset(mixture_or_task_name, task_feature_lengths, split="train",
                                       batch_size=batch_size, shuffle=False, seed=seed, num_epochs=1,
                                       drop_remainder=False, model=model)
    for batch in train.take(train_batches).as_numpy_iterator():
        targets, weights = model.targets_and_weights(batch)
        np.add.at(counts, np.asarray(targets)[np.asarray(weights) > 0], 1)
    counts = _sum_over_hosts(counts) + 1.0
    logp = np.log(counts / counts.sum())
    sums = np.zeros(len(EVAL_SUM_KEYS), np.float64)
    index = {k: i for i, k in enumerate(EVAL_SUM_KEYS)}
    best = int(np.argmax(counts))
    objective = tasks_lib.info(mixture_or_task_name).objective
    for task in task_names_of(mixture_or_task_name):
        ds = data_iterators.get_dataset(task, task_feature_lengths, split="validation", batch_size=batch_size,
                                        shuffle=False, seed=seed, num_epochs=1, objective=objective,
                                        drop_remainder=False, model=model)
        if eval_batches is not None:
            ds = ds.take(eval_batches)
        for batch in ds.as_numpy_iterator():
            targets, weights = model.targets_and_weights(batch)
            targets, weights = np.asarray(targets), np.asarray(weights, np.float64)
            sums[index["nll_sum"]] -= float(np.sum(logp[targets] * weights))
            sums[index["tokens"]] += float(np.sum(weights))
            sums[index["correct"]] += float(np.sum((targets == best) * weights))
    sums = _sum_over_hosts(sums)
    return summarize({k: float(sums[i]) for k, i in index.items()})


def check_task(mixture_or_task_name: str) -> None:
    """One clear error for an unknown task name, before anything is built."""
    tasks_lib.info(mixture_or_task_name)


# ------------------------------------------------------------------ text files and (input, target) scoring


@gin.configurable
def text_file_task(path: str = gin.REQUIRED, vocabulary: str = "byte", objective: str = "lm",
                   documents: str = "line", text_field: str = "text", on_bad_text: str = "error",
                   max_bad_lines: Optional[int] = None, bos="auto") -> str:
    """Register a throwaway corpus whose validation split is the whole file; return its task name.

    Lets `eval` read a text or JSONL file named on the command line (gin/runs/eval_text.gin)
    without registering anything by hand. `vocabulary` is a registered name ("byte", "spm"), a
    tokenizer file (a SentencePiece .model such as the spiece.model / tokenizer.model that came with
    a Hugging Face checkpoint, or a tokenizer.json) or a folder holding one (`import_hf`'s output).
    The file is checked as any corpus file (`corpus.register_corpus`): binary or non-UTF-8 text is
    refused unless `on_bad_text="replace"`, and JSONL lines without the text field fail the read
    above `max_bad_lines` (default 1% of the lines), e.g. --gin.text_file_task.on_bad_text="'replace'".

    `bos` (objective "lm"): "auto" uses the tokenizer's BOS when its `tokenizer(text)` adds one
    (Llama: 1); an int forces one; None never. With a BOS, every document (line) is its own row,
    [BOS] + its tokens (+ EOS only if the tokenizer appends one, which Llama's and GPT-2's do not),
    and every token after the BOS is predicted: exactly transformers' perplexity
    `exp(model(ids, labels=ids).loss)` with `ids = tokenizer(line)`, pooled over the file's tokens
    (a line longer than the targets length is cut into pieces, each read from a fresh BOS). Without
    one (this project's vocabularies, GPT-2), documents are joined into one stream, each followed
    by EOS, in rows that start from id 0, as the `lm` tasks are trained.
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
    corpus_lib.register_corpus(name, **{kind: {"validation": [os.path.abspath(path)]}}, overwrite=True,
                               on_bad_text=on_bad_text, max_bad_lines=max_bad_lines, **extra)
    vocab = vocab_lib.get_vocabulary(vocab_name)
    if bos == "auto":
        bos = vocab_lib.leading_bos_id(vocab)
    elif bos is not None and (isinstance(bos, bool) or not isinstance(bos, int) or not 0 <= bos < vocab.vocab_size):
        raise UserError(f"text_file_task.bos={bos!r} must be 'auto', None or a token id in [0, {vocab.vocab_size})")
    if objective == "lm" and bos is not None:
        return tasks_lib.register_document_lm_task(name, vocab_name, bos, add_eos=vocab_lib.appends_eos(vocab))
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
