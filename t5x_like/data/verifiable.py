"""Verifiable-reward tasks for RL: prompt sets and reward functions registered by name.

A prompt set is a list of records {"prompt": text, ...}; the other fields (e.g. "answer") are
handed to the reward function with the completion. A reward function is
`fn(prompt: str, completion: str, record: dict) -> float`, registered with `@reward_function("name")`
(gin: `rl_train.reward = @python_reward()` with `python_reward.name = 'arithmetic'`).

Built in, offline and deterministic:
- `arithmetic_prompts`: "a+b=" / "a-b=" prompts with their "answer", the splits a fixed partition
  of the sums; reward `arithmetic` is 1.0 when the completion's first integer equals the answer,
  else 0.0.
- `word_count_prompts`: "Write N words:" prompts with "words" = N; reward `word_count` is
  1 - |words written - N| / N, clipped at 0.
- `jsonl_prompts(path)`: records of a JSONL file (each needs "prompt").
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Callable, Mapping

import gin
import numpy as np

from t5x_like.errors import UserError

RewardFn = Callable[[str, str, Mapping], float]
_REWARDS: dict[str, RewardFn] = {}


class VerifiableTaskError(UserError):
    """A prompt set or reward-function name that cannot work; the message names the fix."""


def reward_function(name: str):
    """Decorator registering `fn(prompt, completion, record) -> float` under `name`."""
    def register(fn: RewardFn) -> RewardFn:
        _REWARDS[name] = fn
        return fn
    return register


def get_reward_function(name: str) -> RewardFn:
    if name not in _REWARDS:
        raise VerifiableTaskError(f"no reward function named {name!r}; registered: {sorted(_REWARDS)} (register "
                                  "one with @t5x_like.data.verifiable.reward_function('NAME') in a module your gin "
                                  "file imports)")
    return _REWARDS[name]


def reward_function_names() -> list[str]:
    return sorted(_REWARDS)


_INTEGER = re.compile(r"-?\d+")


@reward_function("arithmetic")
def arithmetic_reward(prompt: str, completion: str, record: Mapping) -> float:
    """1.0 iff the completion's first integer is the record's "answer"."""
    found = _INTEGER.search(completion)
    return float(found is not None and int(found.group()) == int(record["answer"]))


@reward_function("word_count")
def word_count_reward(prompt: str, completion: str, record: Mapping) -> float:
    """1 - |words - N| / N (at least 0) for the requested N = record["words"]."""
    target = int(record["words"])
    return max(0.0, 1.0 - abs(len(completion.split()) - target) / target)


# Disjoint splits by seed offset: the same (seed, split) always gives the same prompts.
_SPLIT_OFFSET = {"train": 0, "validation": 1_000_003, "test": 2_000_003}


def _split_rng(split: str, seed: int) -> np.random.Generator:
    if split not in _SPLIT_OFFSET:
        raise VerifiableTaskError(f"split={split!r}; use one of {sorted(_SPLIT_OFFSET)}")
    return np.random.default_rng(seed + _SPLIT_OFFSET[split])


def _arithmetic_split(a: int, op: str, b: int) -> str:
    """Each sum belongs to one split for good (about 10% validation, 10% test), whatever the counts."""
    bucket = int(hashlib.sha256(f"{a}{op}{b}".encode()).hexdigest(), 16) % 10
    return {0: "validation", 1: "test"}.get(bucket, "train")


@gin.configurable
def arithmetic_prompts(split: str = "train", count: int = 1000, max_operand: int = 20, ops: str = "+",
                       seed: int = 0) -> list[dict]:
    """Up to `count` distinct prompts "a+b=" (or "a-b=" if "-" is in `ops`), 0 <= a, b <= max_operand,
    with their "answer". The splits partition the sums, so success on a held-out split is not
    memorisation of the train one."""
    if not ops or set(ops) - {"+", "-"}:
        raise VerifiableTaskError(f"arithmetic_prompts.ops={ops!r}; use '+', '-' or '+-'")
    rng = _split_rng(split, seed)
    pool = [(a, op, b) for a in range(max_operand + 1) for op in ops for b in range(max_operand + 1)
            if _arithmetic_split(a, op, b) == split]
    if not pool:
        raise VerifiableTaskError(f"arithmetic_prompts(split={split!r}, max_operand={max_operand}) has no sums; "
                                  "raise max_operand")
    order = rng.permutation(len(pool))[:count]
    return [{"prompt": f"{a}{op}{b}=", "answer": str(a + b if op == "+" else a - b)}
            for a, op, b in (pool[i] for i in order)]


@gin.configurable
def word_count_prompts(split: str = "train", count: int = 1000, max_words: int = 8, seed: int = 0) -> list[dict]:
    rng = _split_rng(split, seed)
    return [{"prompt": f"Write {n} words:", "words": int(n)} for n in rng.integers(1, max_words + 1, count)]


@gin.configurable
def jsonl_prompts(path: str = gin.REQUIRED) -> list[dict]:
    """The records of a JSONL file, each with a "prompt" string (a bad one: path:LINE)."""
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise VerifiableTaskError(f"{path}:{n}: not JSON ({e.msg}); one object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise VerifiableTaskError(f"{path}:{n}: a prompt record needs a \"prompt\" string")
            records.append(record)
    if not records:
        raise VerifiableTaskError(f"{path} holds no prompt records")
    return records


def prompts_for_step(records: list, step: int, count: int, seed: int) -> list:
    """The `count` records of RL step `step` (1-based): a fresh permutation per pass over the set,
    derived from (seed, pass) alone, so a resumed run sees the same prompts."""
    n, orders, out = len(records), {}, []
    for i in range((step - 1) * count, step * count):
        epoch, index = divmod(i, n)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(records[int(orders[epoch][index])])
    return out


def check_records(records, what: str = "prompts") -> None:
    if not records:
        raise VerifiableTaskError(f"{what} is empty; give at least one {{'prompt': ...}} record")
    bad = next((r for r in records if not isinstance(r, Mapping) or not isinstance(r.get("prompt"), str)), None)
    if bad is not None:
        raise VerifiableTaskError(f"{what}: record {bad!r} needs a \"prompt\" string")
