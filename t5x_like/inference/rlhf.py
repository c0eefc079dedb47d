"""The RLHF loop (the `rl` mode): sample from the policy, reward, then optimise GRPO or PPO.

Each RL step (gin/runs/grpo.gin, ppo.gin):
1. rollout: `prompts_per_step` prompts of the run's prompt set (a fresh permutation per pass,
   derived from (seed, pass)), each sampled `num_generations` times with the compiled sampler
   (`decoding.generate(method="sample")`, rng = fold_in(seed, step)) from the policy's current
   params, which stay on the mesh (no host round-trip of weights);
2. rewards from `reward` (inference/rl_rewards.py: a Python function by name or a reward model);
3. the rollout's old log-probs, the reference's log-probs and (PPO) the values, in one jitted pass;
   GRPO's group-relative or PPO's GAE advantages (objectives/rl.py);
4. `num_epochs` passes over the rollout in `num_minibatches` minibatches (a permutation per epoch
   from (seed, step, epoch)), each an ordinary train step (`training/steps.py`) with the RL loss as
   its loss hook and the old log-probs fixed.
The reference is the policy's starting point re-derived, never saved with the run: with LoRA the
same params with the adapters off; else `reference_checkpoint` (default `init_checkpoint`); else the
seed's initial params. The checkpoint holds the train state: step (optimizer updates), params
{"policy": the model's, "value_head": PPO's}, optimizer state and rng, saved under the RL step;
everything else is derived from (seed, step), so a resumed run continues exactly.

Logged per RL step (TRL's names): `reward`, `reward_std`, `frac_reward_zero_std`, `kl`, `entropy`,
`clip_ratio`, `completion_length`, `loss`, `grad_norm`, PPO's `policy_loss`, `value_loss`,
`value_clipfrac`, `approx_kl`, `ratio`, `score`/`non_score_reward` (PPO), and
`rollout_tokens_per_s` (generated tokens / sampling time) and `train_tokens_per_s` (prompt +
completion tokens of every optimisation pass / their time). With `eval_prompts`, the mean reward of
greedy completions of those prompts (`eval/reward`; for a 0/1 reward, the success rate) at the
start, every `eval_every` steps and at the end.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from t5x_like import partitioning
from t5x_like.data import verifiable
from t5x_like.data.chat_templates import get_template
from t5x_like.data.vocabularies import get_vocabulary
from t5x_like.errors import UserError
from t5x_like.inference import decoding
from t5x_like.inference.modes import eos_id_of, resolve_bos_id
from t5x_like.objectives import rl
from t5x_like.objectives.preference import adapters_off
from t5x_like.training import run_checks, run_lock, steps
from t5x_like.training.checkpointing import Checkpointer, CheckpointError, checkpoints_dir, restore_params
from t5x_like.training.metrics_writer import MetricsWriter
from t5x_like.training.train_state import TrainState, abstract_params, opt_state_logical_axes, params_logical_axes
from t5x_like.training.trainable import trainable_subset

log = logging.getLogger(__name__)


class RLRunError(UserError):
    """An RL run setting that cannot work; the message names the fix."""


# ---------------------------------------------------------------- state


def _trainable_pattern(model, pattern: Optional[str], value_head: bool) -> Optional[str]:
    """The run's trainable regex over {"policy": ..., "value_head": ...} paths; the value head always trains."""
    pattern = pattern if pattern is not None else model.trainable_params_regex()
    if pattern is None:
        return None
    return f"^{rl.VALUE_HEAD}/|(?:{pattern})" if value_head else pattern


def _param_axes(model, params):
    """Logical PartitionSpecs of {"policy": ..., "value_head": ...}; the value head is replicated."""
    axes = {rl.POLICY: params_logical_axes(model)}
    if rl.VALUE_HEAD in params:
        axes[rl.VALUE_HEAD] = jax.tree_util.tree_map(lambda _: P(), params[rl.VALUE_HEAD])
    return axes


def _init_fn(model, optimizer, value_head: bool):
    def init(rng):
        init_rng, head_rng, train_rng = jax.random.split(jax.random.wrap_key_data(rng), 3)
        params = {rl.POLICY: model.init_variables(init_rng)["params"]}
        if value_head:
            params[rl.VALUE_HEAD] = rl.init_value_head(head_rng, model.config.d_model)
        # An optimizer that factors by logical axes (training/adafactor.py) gets them, as train_state does.
        opt_state = (optimizer.init(params, _param_axes(model, params)) if getattr(optimizer, "uses_param_axes", False)
                     else optimizer.init(params))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                          rng=jax.random.key_data(train_rng))
    return init


def _state_shardings(model, optimizer, mesh, value_head: bool):
    """(abstract state carrying shardings, shardings); the value head is replicated (d_model + 1 numbers)."""
    abstract = jax.eval_shape(_init_fn(model, optimizer, value_head), jax.random.key_data(jax.random.key(0)))
    axes = _param_axes(model, abstract.params)
    logical = TrainState(step=P(), params=axes, rng=P(),
                         opt_state=opt_state_logical_axes(abstract.opt_state, axes, abstract.params))
    with partitioning.activation_context(mesh):
        shardings = partitioning.logical_to_sharding(logical, mesh)
    target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, shardings)
    return target, shardings


def _restore_policy(model, mesh, path: str, what: str, fresh):
    """Params of the checkpoint at `path` (model-fresh parts, e.g. LoRA adapters, from `fresh`)."""
    base_target, _ = model.split_fresh_params(abstract_params(model, mesh, quantized=False))
    try:
        base = restore_params(path, target=base_target, partial=True)
    except CheckpointError as e:
        raise RLRunError(f"{what}={path} does not restore onto the policy's architecture ({e}); it must be a "
                         "checkpoint of the same model config") from None
    with partitioning.activation_context(mesh):
        base = jax.jit(model.quantize_params)(base)
    _, fresh_part = model.split_fresh_params(fresh)
    return model.join_params(base, fresh_part)


def _fresh_state(model, optimizer, mesh, shardings, seed, value_head, init_checkpoint):
    with partitioning.activation_context(mesh):
        state = jax.jit(_init_fn(model, optimizer, value_head), out_shardings=shardings)(
            jax.random.key_data(jax.random.key(seed)))
    if init_checkpoint:
        policy = _restore_policy(model, mesh, init_checkpoint, "init_checkpoint", state.params[rl.POLICY])
        policy = jax.device_put(policy, shardings.params[rl.POLICY])
        state = state.replace(params={**state.params, rl.POLICY: policy})
    return state


def _reference(model, mesh, shardings, seed, value_head, optimizer, init_checkpoint, reference_checkpoint):
    """The frozen reference's params, or None when it is the policy with adapters off (LoRA)."""
    if model.lora is not None and reference_checkpoint is None:
        return None
    path = reference_checkpoint or init_checkpoint
    fresh = _fresh_state(model, optimizer, mesh, shardings, seed, value_head, None).params[rl.POLICY]
    if not path:
        return fresh  # the seed's initial params, re-derived
    return jax.device_put(_restore_policy(model, mesh, path, "reference_checkpoint", fresh),
                          shardings.params[rl.POLICY])


# ---------------------------------------------------------------- rollouts


class _Prompts:
    """Prompt records encoded once, laid out as fixed-shape sampler inputs."""

    def __init__(self, model, vocab, records, max_prompt_length: int, what: str, template=None):
        verifiable.check_records(records, what)
        self.records, self.vocab = list(records), vocab
        bos = resolve_bos_id(vocab)
        self.ids = {}
        for r in self.records:
            text = r["prompt"] if template is None else \
                template.render([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
            ids = model.prompt_ids(list(vocab.encode(text)), bos)
            if not ids:
                raise RLRunError(f"{what}: prompt {r['prompt']!r} encodes to no tokens; give a non-empty prompt")
            if len(ids) > max_prompt_length:
                raise RLRunError(f"{what}: prompt {r['prompt']!r} is {len(ids)} tokens, over max_prompt_length="
                                 f"{max_prompt_length}; raise it or shorten the prompt")
            self.ids[r["prompt"]] = ids
        self.width = max_prompt_length

    def arrays(self, records, repeats: int):
        rows = [self.ids[r["prompt"]] for r in records for _ in range(repeats)]
        out = np.zeros((len(rows), self.width), np.int32)
        for i, ids in enumerate(rows):
            out[i, :len(ids)] = ids
        return out, np.array([len(x) for x in rows], np.int32), rows


def _completions(result, eos_id: int):
    """Each row's generated ids (EOS included) and its text (without EOS)."""
    ids = [list(result.tokens[i, :result.lengths[i]]) for i in range(len(result.lengths))]
    return ids, [x[:-1] if x and x[-1] == eos_id else x for x in ids]


def _fixed_batch(model, prompt_ids, completion_ids, shapes: dict) -> dict:
    """`model.scoring_batch` padded to the run's fixed shapes (one compile for every rollout)."""
    batch = model.scoring_batch(prompt_ids, completion_ids)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = np.pad(v, [(0, 0), (0, shapes[k][0] - v.shape[1])] + [(0, 0)] * (v.ndim - 2))
    return out


def _rollout_stats_fn(model, loss, reference_is_adapters_off: bool):
    """jit(params, ref_params, batch) -> (old logp, ref logp, values or None) [rows, L]."""
    value_head = loss.uses_value_head

    def stats(params, ref_params, batch):
        logp, values = rl.policy_stats(model, params, batch, loss.temperature, value_head)
        ref = adapters_off(params[rl.POLICY])[0] if reference_is_adapters_off else ref_params
        ref_logp, _ = rl.policy_stats(model, {rl.POLICY: jax.lax.stop_gradient(ref)}, batch, loss.temperature)
        return logp, ref_logp, values
    return jax.jit(stats)


# ---------------------------------------------------------------- evaluation


def evaluate_policy(model, params, prompts: _Prompts, reward, *, max_new_tokens: int, eos_id: int,
                    batch_rows: int = 32) -> dict:
    """Mean reward of greedy completions of every prompt (a 0/1 reward: the success rate)."""
    rewards, lengths = [], []
    records = prompts.records
    for start in range(0, len(records), batch_rows):
        chunk = records[start:start + batch_rows]
        padded = chunk + [chunk[-1]] * (batch_rows - len(chunk))  # one compiled shape
        arr, lens, ids = prompts.arrays(padded, 1)
        result = decoding.generate(model, {"params": params}, arr, prompt_lengths=lens, max_new_tokens=max_new_tokens,
                                   method="greedy", eos_id=eos_id)
        full, text_ids = _completions(result, eos_id)
        texts = [prompts.vocab.decode([int(t) for t in x]) for x in text_ids]
        r = reward(padded, [x["prompt"] for x in padded], texts, ids, full)
        rewards.extend(r[:len(chunk)])
        lengths.extend(result.lengths[:len(chunk)])
    return {"reward": float(np.mean(rewards)), "completion_length": float(np.mean(lengths))}


# ---------------------------------------------------------------- metrics


def _scalars(window: list[dict], extra: dict) -> dict:
    sums = {k: sum(float(m[k]) for m in window) for k in window[0] if k not in steps.PER_STEP_METRICS}
    n = max(sums.pop("completion_tokens"), 1.0)
    out = {"loss": float(np.mean([float(m["loss"]) for m in window])),
           "grad_norm": float(np.mean([float(m["grad_norm"]) for m in window]))}
    names = {"clipped": "clip_ratio", "value_clipped": "value_clipfrac"}
    for k, v in sums.items():
        if k not in ("tokens", "loss"):
            out[names.get(k, k)] = v / n
    return {**out, **extra}


# ---------------------------------------------------------------- the loop


def _check_settings(loss, prompts_per_step, num_generations, num_minibatches, num_epochs, max_new_tokens, mesh):
    for name, value in (("prompts_per_step", prompts_per_step), ("num_generations", num_generations),
                        ("num_minibatches", num_minibatches), ("num_epochs", num_epochs),
                        ("max_new_tokens", max_new_tokens)):
        if not isinstance(value, int) or value < 1:
            raise RLRunError(f"rl_train.{name}={value!r} must be a positive integer")
    if not hasattr(loss, "uses_value_head"):
        raise RLRunError(f"rl_train.loss={loss!r} is not an RL objective; bind @GRPOLoss() or @PPOLoss()")
    if isinstance(loss, rl.GRPOLoss) and num_generations < 2:
        raise RLRunError("GRPO compares the samples of a prompt: rl_train.num_generations must be at least 2")
    rows = prompts_per_step * num_generations
    if rows % num_minibatches:
        raise RLRunError(f"{rows} rollout rows (prompts_per_step x num_generations) do not split into "
                         f"num_minibatches={num_minibatches}; use a divisor")
    partitioning.check_batch_size(rows // num_minibatches, mesh)
    if jax.process_count() > 1:
        raise RLRunError("rl_train runs on one host (one process) for now; use a single process")


@gin.configurable(denylist=["gin_config_text"])
def rl_train(*, model=gin.REQUIRED, model_dir: str = gin.REQUIRED, train_steps: int = gin.REQUIRED,
             prompts: Sequence[dict] = gin.REQUIRED, reward: Callable = gin.REQUIRED, loss=gin.REQUIRED,
             optimizer=gin.REQUIRED, vocabulary: str = "byte", prompts_per_step: int = 8, num_generations: int = 4,
             max_prompt_length: int = 32, max_new_tokens: int = 16, top_k: int = 0, top_p: float = 1.0,
             num_epochs: int = 1, num_minibatches: int = 1, init_checkpoint: Optional[str] = None,
             reference_checkpoint: Optional[str] = None, trainable_params: Optional[str] = None, seed: int = 0,
             mesh_fn: Callable = partitioning.create_mesh, checkpoint_every: int = 10, keep_last: int = 2,
             async_checkpoints: bool = True, eval_prompts: Optional[Sequence[dict]] = None, eval_every: int = 0,
             chat_template: Optional[str] = None, progress: bool = True, gin_config_text: str = "") -> dict:
    """Run (or resume) GRPO / PPO until RL step `train_steps` (module docstring); returns the last
    {"train": metrics, "eval": metrics}. `loss`: `@GRPOLoss()` or `@PPOLoss()` (objectives/rl.py;
    its `temperature` is also the sampler's). `prompts` / `eval_prompts`: records {"prompt", ...}
    (data/verifiable.py). `vocabulary` encodes prompts and decodes completions for the reward.
    `chat_template` ("plain", "alpaca", "hf:<dir>"; data/chat_templates.py): render each prompt as a
    user turn plus the generation prompt, as an instruction-tuned (SFT) policy was trained to read it;
    None: the prompt text as is. The reward function sees the record's own prompt either way."""
    mesh = mesh_fn()
    _check_settings(loss, prompts_per_step, num_generations, num_minibatches, num_epochs, max_new_tokens, mesh)
    if not model.can_decode:
        raise RLRunError(f"{type(model).__name__} cannot generate; RL needs a decoder-only or encoder-decoder policy")
    vocab = get_vocabulary(vocabulary)
    eos_id = eos_id_of(vocab)
    template = get_template(chat_template) if chat_template else None
    train_prompts = _Prompts(model, vocab, prompts, max_prompt_length, "rl_train.prompts", template)
    eval_set = _Prompts(model, vocab, eval_prompts, max_prompt_length, "rl_train.eval_prompts", template) \
        if eval_prompts else None
    problem = model.check_prompts(np.ones((1, max_prompt_length), np.int32), np.array([max_prompt_length]),
                                  max_new_tokens)
    if problem:
        raise RLRunError(problem)

    model_dir = os.path.abspath(os.fspath(model_dir))
    run_checks.make_model_dir(model_dir)
    lock = run_lock.lock_run_dir(model_dir)
    writer = checkpointer = None
    try:
        value_head = loss.uses_value_head
        optimizer = trainable_subset(optimizer, _trainable_pattern(model, trainable_params, value_head))
        target, shardings = _state_shardings(model, optimizer, mesh, value_head)
        optimizer.check(target.params)
        checkpointer = Checkpointer(checkpoints_dir(model_dir), save_interval_steps=checkpoint_every,
                                    keep_last=keep_last, keep_best=0, async_save=async_checkpoints)
        restored = checkpointer.restore_latest(target)
        if restored is not None:
            state, start = restored.state, restored.step
            log.info("resumed RL run %s at step %d", model_dir, start)
        else:
            state, start = _fresh_state(model, optimizer, mesh, shardings, seed, value_head, init_checkpoint), 0
        ref_params = _reference(model, mesh, shardings, seed, value_head, optimizer, init_checkpoint,
                                reference_checkpoint)
        if gin_config_text and jax.process_index() == 0:
            with open(os.path.join(model_dir, "config.gin"), "w") as f:
                f.write(gin_config_text)

        rows = prompts_per_step * num_generations
        mb_rows = rows // num_minibatches
        shapes = {k: v.shape[1:] for k, v in model.scoring_batch(
            [[1] * max_prompt_length], [[1] * max_new_tokens]).items()}
        stats_fn = _rollout_stats_fn(model, loss, ref_params is None)
        advantages_fn = jax.jit(loss.advantages_and_returns) if value_head else None
        train_step = steps.make_train_step(model, optimizer, loss=loss, dropout=False,
                                           in_shardings=(shardings, None), out_shardings=(shardings, None))
        writer = MetricsWriter(model_dir, total_steps=train_steps, initial_step=start, progress=progress)
        evaluate = (lambda params: evaluate_policy(model, params, eval_set, reward, max_new_tokens=max_new_tokens,
                                                   eos_id=eos_id)) if eval_set else None
        last = {}
        with partitioning.activation_context(mesh):
            if evaluate and start == 0:
                last["eval"] = evaluate(state.params[rl.POLICY])
                writer.write_scalars(0, last["eval"], "eval")
            for step_no in range(start + 1, train_steps + 1):
                # 1-2. rollout and rewards
                records = verifiable.prompts_for_step(train_prompts.records, step_no, prompts_per_step, seed)
                prompt_arr, prompt_lens, prompt_ids = train_prompts.arrays(records, num_generations)
                t0 = time.perf_counter()
                result = decoding.generate(
                    model, {"params": state.params[rl.POLICY]}, prompt_arr, prompt_lengths=prompt_lens,
                    max_new_tokens=max_new_tokens, method="sample", temperature=loss.temperature, top_k=top_k,
                    top_p=top_p, eos_id=eos_id, rng=jax.random.fold_in(jax.random.key(seed), step_no))
                rollout_s = time.perf_counter() - t0
                full_ids, text_ids = _completions(result, eos_id)
                texts = [vocab.decode([int(t) for t in x]) for x in text_ids]
                row_records = [r for r in records for _ in range(num_generations)]
                scores = reward(row_records, [r["prompt"] for r in row_records], texts, prompt_ids, full_ids)
                # 3. old and reference log-probs, values, advantages
                host_batch = _fixed_batch(model, prompt_ids, full_ids, shapes)
                batch = partitioning.to_global_batch(host_batch, mesh)
                old_logp, ref_logp, values = stats_fn(state.params, ref_params, batch)
                mask = np.asarray(model.targets_and_weights(host_batch)[1])
                extra = {"reward": float(np.mean(scores)),
                         "reward_std": float(rl.group_reward_std(jnp.asarray(scores), num_generations)),
                         "frac_reward_zero_std": float(np.mean(np.std(scores.reshape(-1, num_generations), 1) == 0)),
                         "completion_length": float(np.mean(result.lengths)),
                         "rollout_tokens_per_s": float(np.sum(result.lengths)) / rollout_s}
                features = {rl.OLD_LOGPS: old_logp, rl.REF_LOGPS: ref_logp}
                if value_head:
                    adv, returns, tok_rewards = advantages_fn(
                        jnp.asarray(scores), old_logp, ref_logp, values, jnp.asarray(mask))
                    features.update({rl.ADVANTAGES: adv, rl.VALUES: values, rl.RETURNS: returns})
                    extra["non_score_reward"] = float(np.sum(np.asarray(tok_rewards) * mask) - np.sum(scores)) / rows
                else:
                    features[rl.ADVANTAGES] = loss.advantages(jnp.asarray(scores), num_generations)
                rollout = {**host_batch, **{k: np.asarray(v) for k, v in features.items()}}
                # 4. K epochs of minibatch steps on the fixed rollout
                window = []
                t1 = time.perf_counter()
                for epoch in range(num_epochs):
                    order = (np.random.default_rng([seed, step_no, epoch]).permutation(rows) if num_minibatches > 1
                             else np.arange(rows))
                    for m in range(num_minibatches):
                        idx = order[m * mb_rows:(m + 1) * mb_rows]
                        mb = partitioning.to_global_batch({k: v[idx] for k, v in rollout.items()}, mesh)
                        state, metrics = train_step(state, mb)
                        window.append(metrics)
                window = jax.device_get(window)
                train_s = time.perf_counter() - t1
                if not all(bool(m["is_finite"]) for m in window):
                    raise RLRunError(f"the RL loss or gradient became NaN/Inf at step {step_no}; lower the "
                                     "learning rate or the clip ranges, then rerun to resume from the last checkpoint")
                seen = float(sum(len(p) + len(c) for p, c in zip(prompt_ids, full_ids))) * num_epochs
                extra["train_tokens_per_s"] = seen / train_s
                last["train"] = _scalars(window, extra)
                writer.write_scalars(step_no, last["train"], "train")
                writer.update_progress(step_no, reward=last["train"]["reward"], kl=last["train"]["kl"])
                if evaluate and ((eval_every and step_no % eval_every == 0) or step_no == train_steps):
                    last["eval"] = evaluate(state.params[rl.POLICY])
                    writer.write_scalars(step_no, last["eval"], "eval")
                checkpointer.save(step_no, state, gin_config=gin_config_text, force=step_no == train_steps)
    finally:
        try:
            if writer is not None:
                writer.close()
            if checkpointer is not None:
                checkpointer.close()
        finally:
            lock.release()
    return last
