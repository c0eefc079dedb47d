"""RL rollouts (the `rl` mode, inference/rlhf.py): prompts laid out for the sampler, sampled
completions, their rewards, and the fixed per-token features the update steps read.

One rollout (`Rollouts.__call__`, RL step s):
1. `prompts_per_step` prompts of the prompt set (`verifiable.prompts_for_step`: a fresh permutation
   per pass, from (seed, pass)), each sampled `num_generations` times with the compiled sampler
   (`decoding.generate(method="sample")`, rng = fold_in(seed, s)) from the policy's current params,
   which stay on the mesh (no host round-trip of weights);
2. rewards from `reward` (inference/rl_rewards.py: a Python function by name or a reward model);
3. the old log-probs, the reference's log-probs and (PPO) the values in one jitted pass over
   `model.scoring_batch` padded to fixed shapes (one compile for every rollout), then GRPO's
   group-relative or PPO's GAE advantages (objectives/rl.py).
`evaluate_policy` scores greedy completions of held-out prompts with the same reward.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from t5x_like import partitioning
from t5x_like.data import verifiable
from t5x_like.inference import decoding
from t5x_like.inference.modes import resolve_bos_id
from t5x_like.inference.rl_state import RLRunError
from t5x_like.objectives import rl
from t5x_like.objectives.preference import adapters_off


class Prompts:
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


class Rollout(NamedTuple):
    batch: dict      # host arrays: the scoring batch plus old / ref log-probs, advantages (PPO: values, returns)
    metrics: dict    # reward, reward_std, frac_reward_zero_std, completion_length, rollout_tokens_per_s, ...
    tokens: int      # prompt + completion tokens of every row


@dataclasses.dataclass
class Rollouts:
    """Makes RL step s's rollout from the current params (module docstring); built once per run."""
    model: object
    loss: object
    prompts: Prompts
    reward: Callable
    mesh: object
    eos_id: int
    seed: int
    reference_is_adapters_off: bool
    prompts_per_step: int
    num_generations: int
    max_prompt_length: int
    max_new_tokens: int
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        self._shapes = {k: v.shape[1:] for k, v in self.model.scoring_batch(
            [[1] * self.max_prompt_length], [[1] * self.max_new_tokens]).items()}
        self._stats = _rollout_stats_fn(self.model, self.loss, self.reference_is_adapters_off)
        self._advantages = jax.jit(self.loss.advantages_and_returns) if self.loss.uses_value_head else None

    def __call__(self, params, ref_params, step_no: int) -> Rollout:
        model, n = self.model, self.num_generations
        # 1-2. samples and their rewards
        records = verifiable.prompts_for_step(self.prompts.records, step_no, self.prompts_per_step, self.seed)
        prompt_arr, prompt_lens, prompt_ids = self.prompts.arrays(records, n)
        t0 = time.perf_counter()
        result = decoding.generate(
            model, {"params": params[rl.POLICY]}, prompt_arr, prompt_lengths=prompt_lens,
            max_new_tokens=self.max_new_tokens, method="sample", temperature=self.loss.temperature, top_k=self.top_k,
            top_p=self.top_p, eos_id=self.eos_id, rng=jax.random.fold_in(jax.random.key(self.seed), step_no))
        rollout_s = time.perf_counter() - t0
        full_ids, text_ids = _completions(result, self.eos_id)
        texts = [self.prompts.vocab.decode([int(t) for t in x]) for x in text_ids]
        row_records = [r for r in records for _ in range(n)]
        scores = self.reward(row_records, [r["prompt"] for r in row_records], texts, prompt_ids, full_ids)
        # 3. old and reference log-probs, values, advantages
        host_batch = _fixed_batch(model, prompt_ids, full_ids, self._shapes)
        old_logp, ref_logp, values = self._stats(params, ref_params,
                                                 partitioning.to_global_batch(host_batch, self.mesh))
        mask = np.asarray(model.targets_and_weights(host_batch)[1])
        metrics = {"reward": float(np.mean(scores)),
                   "reward_std": float(rl.group_reward_std(jnp.asarray(scores), n)),
                   "frac_reward_zero_std": float(np.mean(np.std(scores.reshape(-1, n), 1) == 0)),
                   "completion_length": float(np.mean(result.lengths)),
                   "rollout_tokens_per_s": float(np.sum(result.lengths)) / rollout_s}
        features = {rl.OLD_LOGPS: old_logp, rl.REF_LOGPS: ref_logp}
        if self._advantages is not None:
            adv, returns, tok_rewards = self._advantages(jnp.asarray(scores), old_logp, ref_logp, values,
                                                         jnp.asarray(mask))
            features.update({rl.ADVANTAGES: adv, rl.VALUES: values, rl.RETURNS: returns})
            metrics["non_score_reward"] = (float(np.sum(np.asarray(tok_rewards) * mask) - np.sum(scores))
                                           / len(row_records))
        else:
            features[rl.ADVANTAGES] = self.loss.advantages(jnp.asarray(scores), n)
        tokens = sum(len(p) + len(c) for p, c in zip(prompt_ids, full_ids))
        return Rollout({**host_batch, **{k: np.asarray(v) for k, v in features.items()}}, metrics, tokens)


def evaluate_policy(model, params, prompts: Prompts, reward, *, max_new_tokens: int, eos_id: int,
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
