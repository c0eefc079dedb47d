"""The training loop: per-host data -> sharded jitted steps -> metrics, evaluation, checkpoints.

Every run is resumable: rerunning the same command restores the latest good checkpoint in
MODEL_DIR (params, optimizer state, step, rng and each host's data-iterator position), so a run
killed at any point continues bitwise identically. SIGTERM saves and exits cleanly.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Callable, Mapping, Optional

import gin
import jax
import numpy as np

from t5x_like import evaluation, partitioning
from t5x_like.data import iterators as data_iterators
from t5x_like.errors import UserError
from t5x_like.objectives import Loss, summarize
from t5x_like.training import run_checks, steps
from t5x_like.training.checkpointing import restore_params
from t5x_like.training.matmul_peak import measure_matmul_peak
from t5x_like.training.metrics_writer import MetricsWriter
from t5x_like.training.run_context import open_run
from t5x_like.training.train_state import abstract_params, init_fn, sharded_abstract_state
from t5x_like.training.trainable import trainable_subset

log = logging.getLogger(__name__)


class TrainingDivergedError(UserError, RuntimeError):
    """The loss or gradient became NaN/Inf; the last checkpoint before it is intact."""


class TrainingInterrupted(Exception):
    """SIGTERM arrived; the state was saved."""


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between steps (saving mid-step is impossible)."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _batch_shapes(iterator, global_batch: int) -> dict:
    return {k: (global_batch,) + tuple(v.shape[1:]) for k, v in iterator.element_spec.items()}


def _step_scalars(window: list[dict], seconds: float, flops_per_step: float, peak: float) -> dict:
    """Train metrics of the logged window: means of per-step values, per-token ratios of the loss's
    sums over the whole window (objectives/metrics.py)."""
    sums = {k: sum(float(m[k]) for m in window) for k in window[-1] if k not in steps.PER_STEP_METRICS}
    out = {"loss": float(np.mean([m["loss"] for m in window])), **summarize(sums),
           "grad_norm": float(np.mean([m["grad_norm"] for m in window])),
           "step_time_s": seconds / len(window), "tokens_per_s": sums["tokens"] / seconds}
    del out["tokens"]
    if "learning_rate" in window[-1]:
        out["learning_rate"] = float(window[-1]["learning_rate"])
    if peak > 0:
        out["mfu"] = flops_per_step * len(window) / seconds / peak
    return out


def _train_iterator(mixture_or_task_name, task_feature_lengths, batch_size, seed, pack, host_data, mesh, model):
    """This host's resumable training stream: its own data shard ("shard"), or every row of the
    stream filtered to the rows its devices hold ("slice": the same run for any host count)."""
    if host_data not in ("shard", "slice"):
        raise ValueError(f"host_data={host_data!r}; use 'shard' or 'slice'")
    if host_data == "slice":
        return data_iterators.get_iterator(mixture_or_task_name, task_feature_lengths, split="train",
                                           batch_size=batch_size, shuffle=True, seed=seed, pack=pack,
                                           host_rows=partitioning.host_rows_of(mesh, batch_size), model=model)
    return data_iterators.get_iterator(mixture_or_task_name, task_feature_lengths, split="train",
                                       batch_size=batch_size // jax.process_count(), shuffle=True, seed=seed,
                                       pack=pack, model=model)


def _fresh_state(model, optimizer, batch_shapes, mesh, target, state_shardings, seed, init_checkpoint):
    """A new sharded train state (each device materialises its shard only), with the params of
    `init_checkpoint` when fine-tuning."""
    with partitioning.activation_context(mesh):
        state = jax.jit(init_fn(model, optimizer, batch_shapes), out_shardings=state_shardings)(
            jax.random.key_data(jax.random.key(seed)))
    if init_checkpoint:
        # A pretrained checkpoint holds the base weights in float; what the model adds for
        # fine-tuning (`fresh_params_regex`: LoRA adapters, a classifier's head) starts fresh, arrays
        # the model lacks (a masked-LM head) are not read, and a model with weight_quantization
        # stores the base quantized (QLoRA).
        base_target, _ = model.split_fresh_params(abstract_params(model, mesh, batch_shapes, quantized=False))
        base_shardings, _ = model.split_fresh_params(state_shardings.params)
        _, fresh = model.split_fresh_params(state.params)
        base = restore_params(init_checkpoint, target=base_target, partial=True)
        with partitioning.activation_context(mesh):
            base = jax.jit(model.quantize_params, out_shardings=base_shardings)(base)
        state = state.replace(params=model.join_params(base, fresh))
    return state


def _compile(train_step, target, iterator, batch_shapes, mesh, reference=None):
    """Compile before the loop so that step times (and MFU) never include compilation."""
    shapes = {k: (shape, iterator.element_spec[k].dtype.as_numpy_dtype) for k, shape in batch_shapes.items()}
    if reference is not None:
        shapes.update(reference.feature_shapes(batch_shapes))
    batch_target = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=partitioning.batch_sharding(mesh, len(shape)))
                    for k, (shape, dtype) in shapes.items()}
    with partitioning.activation_context(mesh):
        return train_step.lower(target, batch_target).compile()


def _write_eval(writer, step_no: int, results: dict) -> dict:
    """Log {task: metrics}; return the metrics the checkpointer ranks by (pooled perplexity, when the
    evaluation reports one: a preference loss's evaluation does not)."""
    for task, values in results.items():
        split = "eval" if task in ("all",) or len(results) == 1 else f"eval/{task}"
        writer.write_scalars(step_no, values, split)
    pooled = results["all" if "all" in results else next(iter(results))]
    return {"perplexity": pooled["perplexity"]} if "perplexity" in pooled else {}


def _evaluator(model, loss, reference, mixture_or_task_name, task_feature_lengths, batch_size, mesh,
               state_shardings, eval_batches, seed):
    """The periodic evaluator: the model's eval_sums (perplexity), or the loss's own `eval_sums` when
    it has one (DPO: its rewards and accuracies on held-out pairs), with the reference's features."""
    sums_fn = None
    if loss is not None and hasattr(loss, "eval_sums"):
        sums_fn = lambda params, batch: loss.eval_sums(model, params, batch)  # noqa: E731
    add_features = None if reference is None else (lambda batch: reference.add_features(batch, mesh))
    return evaluation.Evaluator(model, mixture_or_task_name, task_feature_lengths, batch_size, mesh,
                                param_shardings=state_shardings.params, max_batches=eval_batches, seed=seed,
                                sums_fn=sums_fn, add_features=add_features)


@gin.configurable(denylist=["gin_config_text", "on_eval"])
def train(*, model=gin.REQUIRED, model_dir: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED, optimizer=gin.REQUIRED, seed: int = 0,
          mesh_fn: Callable = partitioning.create_mesh, num_microbatches: int = 1, loss: Optional[Loss] = None,
          dropout: bool = True, pack: bool = True, log_every: int = 10,
          eval_every: int = 100, eval_batches: Optional[int] = 20, checkpoint_every: int = 100,
          keep_last: int = 3, keep_best: int = 1, async_checkpoints: bool = True,
          init_checkpoint: Optional[str] = None, measure_peak: bool = True, progress: bool = True,
          unigram_baseline_batches: int = 0, host_data: str = "shard", trainable_params: Optional[str] = None,
          infer_eval_every: int = 0, infer_eval: Optional[Callable] = None, reference=None,
          gin_config_text: str = "",
          on_eval: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Train until `train_steps` (resuming from MODEL_DIR); returns the last eval results.

    batch_size is global (all hosts); each host feeds batch_size / process_count rows of its own
    data shard. `loss`: the objective (objectives/loss.py; default `CrossEntropyLoss()` with its
    gin bindings). `init_checkpoint` (fine-tuning) seeds params from another run's checkpoint
    directory when MODEL_DIR has none yet. `unigram_baseline_batches` > 0 also reports the
    perplexity of token frequencies counted on that many train batches, on the same eval batches.
    `host_data`: "shard" (each host reads its own shard of the data) or "slice" (each host reads
    the whole stream and keeps the rows its devices hold: the same batches, hence the same run,
    for any number of hosts). `trainable_params`: a regex over '/'-joined parameter paths; only
    matching parameters train, the rest stay frozen (training/trainable.py; default: the model's
    own choice, e.g. only its LoRA adapters, else everything). `on_eval(step, results)` is called
    after each evaluation with the {task: {metric: value}} results (sweeps report them to Optuna's
    pruner; it may raise to stop).
    `infer_eval_every` > 0: every that many steps (and at the end), generate-and-score evaluation
    with the task's metric_fns; `infer_eval(model, mixture_or_task_name, task_feature_lengths,
    model_dir)` builds its evaluator once (runs/pretrain.gin binds inference's
    `infer_eval_in_training()`); metrics go under infer_eval/<task>, predictions to
    MODEL_DIR/inference_eval/.
    `reference`: a frozen reference model (training/reference.py `FrozenReference`, full-parameter
    DPO) restored from its own checkpoint at every start and resume, never saved with the run; it
    adds its per-row log-probabilities to every train and eval batch.
    """
    run_checks.check_run("train", locals())  # types, ranges, lengths, memory: before anything is built
    if infer_eval_every and infer_eval is None:
        raise run_checks.RunValueError("train.infer_eval_every needs train.infer_eval (runs/pretrain.gin binds "
                                       "@infer_eval_in_training())")
    with open_run(model_dir) as run:  # MODEL_DIR locked before anything is written: one run per directory
        model_dir = run.model_dir
        evaluation.check_task(mixture_or_task_name)
        mesh = mesh_fn()
        partitioning.check_batch_size(batch_size, mesh)
        if batch_size % jax.process_count():
            raise partitioning.MeshError(f"batch size {batch_size} is not divisible by {jax.process_count()} hosts")

        optimizer = trainable_subset(optimizer, trainable_params if trainable_params is not None
                                     else model.trainable_params_regex())
        iterator = _train_iterator(mixture_or_task_name, task_feature_lengths, batch_size, seed, pack, host_data, mesh,
                                   model)
        batch_shapes = _batch_shapes(iterator, batch_size)
        target, state_shardings = sharded_abstract_state(model, optimizer, batch_shapes, mesh)
        optimizer.check(target.params)
        if reference is not None:
            reference.load(model, mesh, batch_shapes)

        checkpointer = run.checkpointer(save_interval_steps=checkpoint_every, keep_last=keep_last,
                                        keep_best=keep_best, async_save=async_checkpoints)
        restored = checkpointer.restore_latest(target)
        if restored is not None:
            state = restored.state
            if restored.data_state is not None:
                iterator.restore(restored.data_state, restored.data_position)
            log.info("resumed from %s step %d", checkpointer.directory, restored.step)
        else:
            state = _fresh_state(model, optimizer, batch_shapes, mesh, target, state_shardings, seed, init_checkpoint)
        start = int(jax.device_get(state.step))
        run.write_file("config.gin", gin_config_text)  # after a refused resume could have stopped us

        train_step = steps.make_train_step(
            model, optimizer, loss=loss, num_microbatches=num_microbatches,
            dropout=dropout, in_shardings=(state_shardings, None), out_shardings=(state_shardings, None))
        train_step = _compile(train_step, target, iterator, batch_shapes, mesh, reference)
        evaluator = _evaluator(model, loss, reference, mixture_or_task_name, task_feature_lengths, batch_size, mesh,
                               state_shardings, eval_batches, seed)
        infer_evaluator = (infer_eval(model, mixture_or_task_name, task_feature_lengths, model_dir)
                           if infer_eval_every else None)
        lengths = {k: v[1] for k, v in batch_shapes.items()}
        float_params = abstract_params(model, batch_shapes=batch_shapes, quantized=False)
        flops_per_step = optimizer.flops_per_example(model, float_params, lengths) * batch_size
        peak = measure_matmul_peak() if measure_peak else 0.0
        writer = run.writer(total_steps=train_steps, initial_step=start, progress=progress)
        if start == 0 and gin_config_text:
            writer.write_text(0, "gin_config", gin_config_text)

        pending: list[tuple[int, dict]] = []   # per-step metrics still on device
        window: list[dict] = []                 # fetched metrics since the last log line
        window_start = time.perf_counter()
        last_eval: dict = {}

        def drain() -> None:
            """Fetch pending metrics; stop at the first non-finite step (before anything is saved)."""
            for step_no, m in jax.device_get(pending):
                if not bool(m["is_finite"]):
                    raise TrainingDivergedError(
                        f"loss or gradient became NaN/Inf at step {step_no}; the last verified checkpoint "
                        f"(step {checkpointer.latest_verified_step()}) is intact. Lower the learning rate, enable "
                        "z_loss or gradient clipping, then rerun the same command to resume")
                window.append(m)
            pending.clear()

        def save(step_no: int, force: bool = False, metrics: Optional[dict] = None) -> None:
            if force or checkpointer.should_save(step_no):
                drain()
                checkpointer.save(step_no, state, data_state=iterator, gin_config=gin_config_text,
                                  metrics=metrics, force=force)

        with _SigtermFlag() as sigterm, partitioning.activation_context(mesh):
            for step_no in range(start + 1, train_steps + 1):
                try:
                    host_batch = next(iterator)
                except StopIteration:
                    raise RuntimeError(f"training data of {mixture_or_task_name!r} ran out at step {step_no}")
                batch = partitioning.to_global_batch(host_batch, mesh)
                if reference is not None:
                    batch = reference.add_features(batch, mesh)
                state, metrics = train_step(state, batch)
                pending.append((step_no, metrics))

                if step_no % log_every == 0 or step_no == train_steps:
                    drain()
                    seconds = time.perf_counter() - window_start
                    scalars = _step_scalars(window, seconds, flops_per_step, peak)
                    writer.write_scalars(step_no, scalars, "train")
                    writer.update_progress(step_no, tokens=int(sum(float(m["tokens"]) for m in window)),
                                           loss=scalars["loss"])
                    window.clear()
                    window_start = time.perf_counter()
                eval_metrics = None
                if eval_every and (step_no % eval_every == 0 or step_no == train_steps):
                    drain()
                    last_eval = evaluator.evaluate(state.params)
                    eval_metrics = _write_eval(writer, step_no, last_eval)
                    if on_eval is not None:
                        on_eval(step_no, last_eval)
                    window_start = time.perf_counter()
                if infer_evaluator is not None and (step_no % infer_eval_every == 0 or step_no == train_steps):
                    drain()
                    infer_evaluator.evaluate(state.params, step_no, writer=writer)
                    window_start = time.perf_counter()
                save(step_no, force=step_no == train_steps, metrics=eval_metrics)
                if sigterm.raised:
                    save(step_no, force=True, metrics=eval_metrics)
                    checkpointer.wait_until_finished()
                    raise TrainingInterrupted(f"SIGTERM: saved step {step_no} to {checkpointer.directory}; "
                                              "rerun the same command to resume")
            drain()
            if not last_eval and eval_every:  # nothing left to train (a finished run rerun): report anyway
                last_eval = evaluator.evaluate(state.params)
        checkpointer.wait_until_finished()
        run.write_file("operative_config.gin", gin.operative_config_str())
        if unigram_baseline_batches and last_eval:
            baseline = evaluation.unigram_baseline(model, mixture_or_task_name, task_feature_lengths,
                                                   batch_size, unigram_baseline_batches, eval_batches, seed)
            writer.write_scalars(train_steps, baseline, "unigram_baseline")
            last_eval = {**last_eval, "unigram_baseline": baseline}
    return last_eval


@gin.configurable(denylist=["gin_config_text"])
def evaluate(*, model=gin.REQUIRED, checkpoint_dir: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
             task_feature_lengths: Mapping[str, int] = gin.REQUIRED, batch_size: int = gin.REQUIRED,
             split: str = "validation", eval_batches: Optional[int] = None, step: Optional[int] = None,
             seed: int = 0, mesh_fn: Callable = partitioning.create_mesh, output_dir: Optional[str] = None,
             gin_config_text: str = "") -> dict:
    """Perplexity of a checkpoint (a run's MODEL_DIR or a checkpoints folder) on a split."""
    run_checks.check_run("evaluate", locals())
    evaluation.check_task(mixture_or_task_name)
    mesh = mesh_fn()
    partitioning.check_batch_size(batch_size, mesh)
    target = abstract_params(model, mesh)
    shardings = jax.tree_util.tree_map(lambda a: a.sharding, target)
    params = restore_params(checkpoint_dir, step=step, target=target)
    evaluator = evaluation.Evaluator(model, mixture_or_task_name, task_feature_lengths, batch_size, mesh,
                                     param_shardings=shardings, split=split, max_batches=eval_batches, seed=seed)
    results = evaluator.evaluate(params)
    if output_dir:
        writer = MetricsWriter(output_dir, progress=False)
        for task, values in results.items():
            writer.write_scalars(step or 0, values, f"{split}/{task}")
        writer.close()
    return results
