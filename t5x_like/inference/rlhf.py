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

Where: steps 1-3 and the greedy evaluation are `inference/rl_rollout.py`, the train state and the
reference `inference/rl_state.py`, step 4 and the loop here; the run directory's lock, metrics
writer and checkpointer are opened and closed by `training/run_context.py`, as the trainer's are.

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
import time
from typing import Callable, Optional, Sequence

import gin
import jax
import numpy as np

from t5x_like import partitioning
from t5x_like.data.chat_templates import get_template
from t5x_like.data.vocabularies import get_vocabulary
from t5x_like.inference.modes import eos_id_of
from t5x_like.inference.rl_rollout import Prompts, Rollouts, evaluate_policy
from t5x_like.inference.rl_state import (RLRunError, fresh_state, reference_params, state_shardings,
                                         trainable_pattern)
from t5x_like.objectives import rl
from t5x_like.training import steps
from t5x_like.training.run_context import open_run
from t5x_like.training.trainable import trainable_subset

log = logging.getLogger(__name__)

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


def _optimise(train_step, state, rollout: dict, *, num_epochs: int, num_minibatches: int, seed: int, step_no: int,
              mesh):
    """4. `num_epochs` passes over the fixed rollout in `num_minibatches` minibatches (a permutation per
    epoch from (seed, step, epoch)); returns the state and every step's metrics, fetched."""
    rows = len(next(iter(rollout.values())))
    mb_rows = rows // num_minibatches
    window = []
    for epoch in range(num_epochs):
        order = (np.random.default_rng([seed, step_no, epoch]).permutation(rows) if num_minibatches > 1
                 else np.arange(rows))
        for m in range(num_minibatches):
            idx = order[m * mb_rows:(m + 1) * mb_rows]
            mb = partitioning.to_global_batch({k: v[idx] for k, v in rollout.items()}, mesh)
            state, metrics = train_step(state, mb)
            window.append(metrics)
    window = jax.device_get(window)
    if not all(bool(m["is_finite"]) for m in window):
        raise RLRunError(f"the RL loss or gradient became NaN/Inf at step {step_no}; lower the "
                         "learning rate or the clip ranges, then rerun to resume from the last checkpoint")
    return state, window


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
    train_prompts = Prompts(model, vocab, prompts, max_prompt_length, "rl_train.prompts", template)
    eval_set = Prompts(model, vocab, eval_prompts, max_prompt_length, "rl_train.eval_prompts", template) \
        if eval_prompts else None
    problem = model.check_prompts(np.ones((1, max_prompt_length), np.int32), np.array([max_prompt_length]),
                                  max_new_tokens)
    if problem:
        raise RLRunError(problem)

    with open_run(model_dir) as run:
        value_head = loss.uses_value_head
        optimizer = trainable_subset(optimizer, trainable_pattern(model, trainable_params, value_head))
        target, shardings = state_shardings(model, optimizer, mesh, value_head)
        optimizer.check(target.params)
        checkpointer = run.checkpointer(save_interval_steps=checkpoint_every, keep_last=keep_last, keep_best=0,
                                        async_save=async_checkpoints)
        restored = checkpointer.restore_latest(target)
        if restored is not None:
            state, start = restored.state, restored.step
            log.info("resumed RL run %s at step %d", run.model_dir, start)
        else:
            state, start = fresh_state(model, optimizer, mesh, shardings, seed, value_head, init_checkpoint), 0
        ref_params = reference_params(model, mesh, shardings, seed, value_head, optimizer, init_checkpoint,
                                      reference_checkpoint)
        if gin_config_text:
            run.write_file("config.gin", gin_config_text)

        rollouts = Rollouts(model=model, loss=loss, prompts=train_prompts, reward=reward, mesh=mesh, eos_id=eos_id,
                            seed=seed, reference_is_adapters_off=ref_params is None,
                            prompts_per_step=prompts_per_step, num_generations=num_generations,
                            max_prompt_length=max_prompt_length, max_new_tokens=max_new_tokens, top_k=top_k,
                            top_p=top_p)
        train_step = steps.make_train_step(model, optimizer, loss=loss, dropout=False,
                                           in_shardings=(shardings, None), out_shardings=(shardings, None))
        writer = run.writer(total_steps=train_steps, initial_step=start, progress=progress)
        evaluate = (lambda params: evaluate_policy(model, params, eval_set, reward, max_new_tokens=max_new_tokens,
                                                   eos_id=eos_id)) if eval_set else None
        last = {}
        with partitioning.activation_context(mesh):
            if evaluate and start == 0:
                last["eval"] = evaluate(state.params[rl.POLICY])
                writer.write_scalars(0, last["eval"], "eval")
            for step_no in range(start + 1, train_steps + 1):
                rollout = rollouts(state.params, ref_params, step_no)  # 1-3
                t1 = time.perf_counter()
                state, window = _optimise(train_step, state, rollout.batch, num_epochs=num_epochs,  # 4
                                          num_minibatches=num_minibatches, seed=seed, step_no=step_no, mesh=mesh)
                train_s = time.perf_counter() - t1
                extra = {**rollout.metrics, "train_tokens_per_s": float(rollout.tokens) * num_epochs / train_s}
                last["train"] = _scalars(window, extra)
                writer.write_scalars(step_no, last["train"], "train")
                writer.update_progress(step_no, reward=last["train"]["reward"], kl=last["train"]["kl"])
                if evaluate and ((eval_every and step_no % eval_every == 0) or step_no == train_steps):
                    last["eval"] = evaluate(state.params[rl.POLICY])
                    writer.write_scalars(step_no, last["eval"], "eval")
                checkpointer.save(step_no, state, gin_config=gin_config_text, force=step_no == train_steps)
    return last
