"""Generate-and-score evaluation, as T5X's infer_eval: decode every example of a task's split and
score the predictions with the task's own `metric_fns` (BLEU, ROUGE, exact match, ...).

For each task of a seqio mixture (or one task) with "inputs" and "targets" features:
1. the split is read with `task.get_dataset(sequence_length, split, shuffle=False, num_epochs=1)`
   (no feature converter: the decoder needs each example's own token ids), optionally only its
   first `max_examples` examples;
2. each example's inputs become a prompt through the model contract (`prompt_ids`), and prompts are
   decoded with `decoding.generate` (greedy, sampling or beam search) in batches of a fixed
   `batch_size` (the last one padded), so decoding compiles once per task;
3. seqio's `Evaluator` detokenizes the predictions with the targets vocabulary (up to EOS), applies
   the task's `postprocess_fn` to them (is_target=False) and to `targets_pretokenized`
   (is_target=True), and calls each metric_fn(targets, predictions). seqio's machinery is used as
   is: a pass-through feature converter hands it the task features, `model_fns` supply the tokens
   (and, for score metrics, log-likelihoods), and a `seqio.Logger` collects the postprocessed
   predictions and targets for the predictions file.
4. Results: `<output_dir>/inference_eval/<task>-<step>.jsonl`, one line per example
   {"task", "index", "input", "target", "prediction", "output"} (target and prediction as the
   metrics saw them, output the detokenized text before postprocessing), and the metrics through
   a `MetricsWriter` (metrics.jsonl and TensorBoard) under split "infer_eval/<task>".

Prompts: the task's inputs are laid out as its feature converter feeds them in training, so they
already end with EOS when the inputs feature has add_eos. The model adds what else its prompts
carry (`prompt_ids(ids, bos_id)`: a decoder-only model's BOS, `bos_id`, 0 for this project's
tasks), and the prompt ends with EOS exactly when the task's inputs do: the encoder-decoder reads
the inputs as they are, a decoder-only model [BOS] + inputs, as it was trained on inputs then
targets.

Metric functions for tasks: t5x_like/data/metrics.py. Used by the `infer_eval` mode
(gin/runs/infer_eval.gin) and by training every `train.infer_eval_every` steps. With several
hosts, each decodes every example (the params may be sharded; the decoding calls are the same on
all hosts) and process 0 writes the files.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from typing import Callable, Mapping, Optional

import gin
import jax
import numpy as np
import seqio
from seqio import metrics as seqio_metrics

from t5x_like.errors import UserError
from t5x_like.inference import decoding
from t5x_like.training import run_checks
from t5x_like.training.checkpointing import restore_params_and_step
from t5x_like.training.metrics_writer import MetricsWriter
from t5x_like.training.train_state import abstract_params

log = logging.getLogger(__name__)

PREDICTIONS_DIR = "inference_eval"   # <output_dir>/inference_eval/<task>-<step>.jsonl
SPLIT = "infer_eval"                 # metrics.jsonl split and TensorBoard run: infer_eval/<task>
Output = seqio_metrics.ModelOutputType


class InferEvalError(UserError):
    """A task or setting infer_eval cannot use; the message says which and what to do."""


class _TaskFeatures(seqio.PassThroughFeatureConverter):
    """seqio.Evaluator converts task features for the model; the decoder reads them as they are."""

    TASK_FEATURES = {}
    MODEL_FEATURES = {}
    pack = False


class _Collect(seqio.Logger):
    """Keeps what seqio's Evaluator logs per task: the examples, predictions and targets."""

    def __init__(self, output_dir, sink: dict):
        super().__init__(output_dir)
        self.sink = sink

    def __call__(self, task_name, step, metrics, dataset, inferences, targets):
        self.sink[task_name] = (dataset, dict(inferences or {}), targets)


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _jsonable(value):
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _scalar(value) -> Optional[float]:
    """A metric's number, or None for values with no single number (text, histograms)."""
    if isinstance(value, seqio_metrics.Scalar):
        value = value.value
    try:
        arr = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        return None
    return float(arr) if arr.shape == () else None


def _pad_rows(rows) -> np.ndarray:
    """Token rows of any lengths as one int32 array padded with 0 (seqio decodes up to EOS)."""
    rows = [np.asarray(r, np.int32).reshape(-1) for r in rows]
    out = np.zeros((len(rows), max(1, max(len(r) for r in rows))), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _check_task(task: seqio.Task, split: str) -> Optional[str]:
    """Why `task` cannot be evaluated this way, or None."""
    missing = [k for k in ("inputs", "targets") if k not in task.output_features]
    if missing:
        return f"it has no {' or '.join(repr(k) for k in missing)} feature (it has {sorted(task.output_features)})"
    if split not in task.splits:
        return f"it has no {split!r} split (it has {list(task.splits)})"
    if not task.metric_objs:
        return "it has no metric_fns (e.g. metric_fns=[t5x_like.data.metrics.exact_match])"
    return None


def task_prompt(model, inputs, bos_id: Optional[int], eos_id: int = 1) -> list[int]:
    """The model's prompt for a task example's inputs ids: what `model.prompt_ids` adds to text ids
    (a decoder-only model's BOS), ending with EOS exactly when the task's inputs do (add_eos), as
    the feature converter laid them out in training."""
    ids = [int(t) for t in np.asarray(inputs).reshape(-1)]
    ends_with_eos = bool(ids) and ids[-1] == eos_id
    prompt = list(model.prompt_ids(ids[:-1] if ends_with_eos else ids, bos_id))
    if prompt and prompt[-1] == eos_id:
        prompt = prompt[:-1]
    return prompt + ([eos_id] if ends_with_eos else [])


@gin.configurable(denylist=["model", "mixture_or_task_name", "task_feature_lengths", "output_dir"])
class InferEvaluator:
    """Decodes a task's (or each task of a mixture's) split and scores it with the task's metric_fns.

    Built once (it reads and caches the examples), then `evaluate(params, step)` as often as
    needed. `max_new_tokens` defaults to the targets length; decoding settings as in
    `decoding.generate`. `output_dir`: where predictions files go (None: nowhere).
    """

    def __init__(self, model, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                 output_dir: Optional[str] = None, *, split: str = "validation", max_examples: Optional[int] = None,
                 batch_size: int = 8, max_new_tokens: Optional[int] = None, method: str = "greedy",
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_beams: int = 4,
                 length_penalty: float = 1.0, early_stopping=False, bos_id: Optional[int] = 0, seed: int = 0):
        run_checks.check_int(batch_size, "InferEvaluator.batch_size", 1, "examples decoded at once")
        run_checks.check_int(max_examples, "InferEvaluator.max_examples", 1,
                             "examples read per task (None: the whole split)", allow_none=True)
        run_checks.check_int(max_new_tokens, "InferEvaluator.max_new_tokens", 1,
                             "tokens generated per example (None: the targets length)", allow_none=True)
        lengths = run_checks.check_task_feature_lengths(task_feature_lengths)
        if not {"inputs", "targets"} <= set(lengths):
            raise InferEvalError(f"TASK_FEATURE_LENGTHS={dict(lengths)!r} needs 'inputs' and 'targets' "
                                 "lengths, e.g. {'inputs': 256, 'targets': 64}")
        if method not in decoding.METHODS:
            raise InferEvalError(f"InferEvaluator.method={method!r}; use one of {decoding.METHODS}")
        if not model.can_decode:
            raise InferEvalError(f"{type(model).__name__} cannot generate, so it cannot be evaluated on "
                                 "generated text; use an encoder-decoder or decoder-only model")
        self.model, self.output_dir, self.batch_size, self.seed = model, output_dir, batch_size, seed
        self.bos_id = bos_id
        self.decode_kwargs = dict(max_new_tokens=int(max_new_tokens or lengths["targets"]), method=method,
                                  temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams,
                                  length_penalty=length_penalty, early_stopping=early_stopping)
        try:
            provider = seqio.get_mixture_or_task(mixture_or_task_name)
        except ValueError:
            raise InferEvalError(f"no seqio task or mixture {mixture_or_task_name!r}; register it first (a gin "
                                 "file can `import` the module that calls seqio.TaskRegistry.add)") from None
        tasks = seqio.get_subtasks(provider)
        problems = {t.name: _check_task(t, split) for t in tasks}
        if all(problems.values()):
            raise InferEvalError("nothing to evaluate: " + "; ".join(
                f"task {name!r} cannot be evaluated on generated text: {why}" for name, why in problems.items()))
        for name, why in problems.items():
            if why:
                log.warning("infer_eval skips task %r: %s", name, why)
        self._logged: dict = {}
        self._decoded: dict = {}
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        absl_log.setLevel(logging.ERROR)  # seqio warns whenever TASK_FEATURE_LENGTHS exceed the longest example
        try:
            self.evaluator = seqio.Evaluator(
                mixture_or_task_name, feature_converter=_TaskFeatures(), eval_split=split, seed=seed,
                sequence_length=dict(lengths), num_examples=max_examples, shuffle=False,
                logger_cls=[functools.partial(_Collect, sink=self._logged)],
                log_dir=os.path.join(output_dir or ".", PREDICTIONS_DIR), async_compute_metrics=False)
        finally:
            absl_log.setLevel(level)
        self.tasks = {t.name: t for t in self.evaluator.eval_tasks}
        for name, ds in self.evaluator.cached_task_datasets.items():
            if int(ds.cardinality()) == 0:
                raise InferEvalError(f"the {split!r} split of task {name!r} holds no examples")
        # seqio hands each model_fn a task's cached dataset; which task it is decides the EOS ids.
        self._task_of = {id(ds): name for name, ds in self.evaluator.cached_model_datasets.items()}

    # ------------------------------------------------------------ prompts and decoding

    def prompt(self, inputs, eos_id: int = 1) -> list[int]:
        return task_prompt(self.model, inputs, self.bos_id, eos_id)

    def _decode(self, variables, dataset):
        """(indices, generated token rows [n, max_new_tokens], scores) of an enumerated task dataset;
        decoded once per dataset and evaluate() call."""
        key = id(dataset)
        if key in self._decoded:
            return self._decoded[key]
        features = self.tasks[self._task_of[key]].output_features
        indices, prompts = [], []
        for index, ex in dataset.as_numpy_iterator():
            indices.append(int(index))
            prompts.append(self.prompt(ex["inputs"], features["inputs"].vocabulary.eos_id))
        if any(len(p) == 0 for p in prompts):
            raise InferEvalError("an example with empty inputs makes an empty prompt; set InferEvaluator.bos_id "
                                 "(decoder-only models start from it) or drop such examples")
        width, size = max(len(p) for p in prompts), self.batch_size
        rounded = -(-width // 8) * 8  # tasks of similar lengths share one compiled decoder
        if self.model.check_prompts(np.zeros((1, rounded), np.int32), np.array([width]),
                                    self.decode_kwargs["max_new_tokens"]) is None:
            width = rounded
        tokens, scores, rng = [], [], jax.random.key(self.seed)
        for start in range(0, len(prompts), size):
            chunk = prompts[start:start + size]
            rows = np.zeros((size, width), np.int32)
            lengths = np.zeros((size,), np.int32)
            for i in range(size):  # a short last batch repeats its first prompt: the same shapes, one compile
                p = chunk[i] if i < len(chunk) else chunk[0]
                rows[i, :len(p)], lengths[i] = p, len(p)
            rng, sub = jax.random.split(rng)
            res = decoding.generate(self.model, variables, rows, prompt_lengths=lengths, rng=sub,
                                    eos_id=features["targets"].vocabulary.eos_id, **self.decode_kwargs)
            tokens.extend(res.tokens[:len(chunk)])
            scores.extend(float(s) for s in res.scores[:len(chunk)])
        self._decoded[key] = (indices, tokens, scores)
        return self._decoded[key]

    def _predict(self, variables, dataset):
        indices, tokens, _ = self._decode(variables, dataset)
        return list(zip(indices, tokens))

    def _predict_with_aux(self, variables, dataset):
        indices, tokens, scores = self._decode(variables, dataset)
        return list(zip(indices, tokens)), {"scores": scores}

    def _score(self, variables, dataset):
        """Log-likelihood of each example's targets given its prompt (score metric_fns); batches are
        padded to their longest pair (`evaluation.score_pairs`), so this compiles per batch shape."""
        from t5x_like import evaluation

        eos_id = self.tasks[self._task_of[id(dataset)]].output_features["inputs"].vocabulary.eos_id
        indices, prompts, targets = [], [], []
        for index, ex in dataset.as_numpy_iterator():
            indices.append(int(index))
            prompts.append(self.prompt(ex["inputs"], eos_id))
            targets.append([int(t) for t in ex["targets"]])
        scores = evaluation.score_pairs(self.model, variables, prompts, targets, batch_size=self.batch_size)
        return list(zip(indices, scores.tolist()))

    # ------------------------------------------------------------ evaluation

    def evaluate(self, params, step: int = 0, *, writer: Optional[MetricsWriter] = None,
                 predict_fn: Optional[Callable] = None) -> dict[str, dict[str, float]]:
        """{task: {metric: value}} of `params`; writes each task's predictions file (when there is
        an output_dir) and, given a `writer`, the metrics under split "infer_eval/<task>".

        `predict_fn(dataset) -> [(index, token ids)]` replaces the model's decoding (seqio's
        predict_fn convention; `dataset` yields (index, task example)), e.g. to check a task's
        metrics against known outputs.
        """
        variables = {"params": params}
        self._logged.clear()
        self._decoded.clear()
        if predict_fn is not None:
            predict = lambda ds: self._padded(predict_fn(ds))  # noqa: E731
        else:
            predict = functools.partial(self._predict, variables)
        model_fns = {Output.PREDICTION: predict,
                     Output.PREDICTION_WITH_AUX: functools.partial(self._predict_with_aux, variables),
                     Output.SCORE: functools.partial(self._score, variables)}
        try:
            future, _ = self.evaluator.evaluate(compute_metrics=True, step=step, model_fns=model_fns)
            metrics = future.result()
        finally:
            self._decoded.clear()
        results = {}
        for name in self.tasks:
            values = {k: _scalar(v) for k, v in metrics[name].items()}
            results[name] = {k: v for k, v in values.items() if v is not None}
            self._write_predictions(name, step)
            if writer is not None:
                writer.write_scalars(step, results[name], f"{SPLIT}/{name}")
        return results

    @staticmethod
    def _padded(indices_and_tokens):
        pairs = list(indices_and_tokens)
        rows = _pad_rows([tokens for _, tokens in pairs])
        return [(int(index), row) for (index, _), row in zip(pairs, rows)]

    def predictions_path(self, task: str, step: int) -> Optional[str]:
        if self.output_dir is None:
            return None
        return os.path.join(self.output_dir, PREDICTIONS_DIR, f"{task}-{int(step)}.jsonl")

    def _write_predictions(self, task_name: str, step: int) -> None:
        path = self.predictions_path(task_name, step)
        if path is None or jax.process_index() != 0 or task_name not in self._logged:
            return
        dataset, inferences, targets = self._logged[task_name]
        inputs_vocab = self.tasks[task_name].output_features["inputs"].vocabulary
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for i, ex in enumerate(dataset.as_numpy_iterator()):
                text = (_text(ex["inputs_pretokenized"]) if "inputs_pretokenized" in ex
                        else inputs_vocab.decode([int(t) for t in ex["inputs"]]))
                record = {"task": task_name, "index": i, "input": text,
                          "target": targets[i] if targets is not None else None}
                for key in ("prediction", "output", "score"):
                    if key in inferences:
                        record[key] = inferences[key][i]
                f.write(json.dumps(record, default=_jsonable, ensure_ascii=False) + "\n")
        os.replace(tmp, path)


# ---------------------------------------------------------------- the mode and the trainer's hook


@gin.configurable(denylist=["gin_config_text"])
def infer_eval(*, model=gin.REQUIRED, checkpoint_dir: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
               task_feature_lengths: Mapping[str, int] = gin.REQUIRED, output_dir: str = gin.REQUIRED,
               step: Optional[int] = None, gin_config_text: str = "") -> dict:
    """The `infer_eval` mode (gin/runs/infer_eval.gin): generate-and-score evaluation of checkpoint
    `step` (default: the latest) of `checkpoint_dir`; predictions and metrics go to `output_dir`.
    Returns {task: {metric: value}}."""
    run_checks.check_int(step, "infer_eval.step", 0, "the checkpoint step (None: the latest)", allow_none=True)
    if not isinstance(output_dir, (str, os.PathLike)):
        raise InferEvalError(f"OUTPUT_DIR={output_dir!r} must be a path, e.g. --gin.OUTPUT_DIR=\"'/tmp/infer_eval'\"")
    output_dir = os.path.abspath(os.fspath(output_dir))
    evaluator = InferEvaluator(model, mixture_or_task_name, task_feature_lengths, output_dir)  # task errors first
    params, step = restore_params_and_step(checkpoint_dir, step, target=abstract_params(model))
    with MetricsWriter(output_dir, progress=False) as writer:
        if gin_config_text:
            writer.write_text(step, "gin_config", gin_config_text, split=SPLIT)
        results = evaluator.evaluate(params, step, writer=writer)
    print(f"infer_eval: checkpoint step {step}; predictions in {os.path.join(output_dir, PREDICTIONS_DIR)}, "
          f"metrics in {os.path.join(output_dir, 'metrics.jsonl')}", file=sys.stderr)
    return results


@gin.configurable
def infer_eval_in_training(mixture_or_task_name: Optional[str] = None,
                           task_feature_lengths: Optional[Mapping[str, int]] = None) -> Callable:
    """What `train.infer_eval` calls to build the trainer's InferEvaluator (gin/runs/pretrain.gin):
    the training mixture and lengths unless these name others (e.g. a downstream task while
    pretraining). Settings: InferEvaluator.* bindings; predictions go to MODEL_DIR/inference_eval."""

    def build(model, train_mixture_or_task_name: str, train_task_feature_lengths: Mapping[str, int],
              output_dir: str) -> InferEvaluator:
        return InferEvaluator(model, mixture_or_task_name or train_mixture_or_task_name,
                              task_feature_lengths or train_task_feature_lengths, output_dir)

    return build
