"""Where an RL run's rewards come from: a Python function by name, or a trained reward model.

Both are callables `reward(records, prompts, completions, prompt_ids, completion_ids) -> [rows]
float32` (texts decoded with the run's vocabulary, completions without EOS; ids as the policy saw
them), built by gin: `rl_train.reward = @python_reward()` (`python_reward.name = 'arithmetic'`,
the registry of `data/verifiable.py`) or `@reward_model_reward()` (a `RewardModel` run scored with
`objectives/reward.score_completions` on the policy's own token ids, so it must share the policy's
vocabulary). A reward function that raises, or returns something that is not a finite number,
stops the run with one line naming the prompt and the completion (`RewardFunctionError`).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import gin
import jax
import numpy as np

from t5x_like.data import verifiable
from t5x_like.errors import UserError, one_line
from t5x_like.objectives.reward import score_completions


class RewardFunctionError(UserError):
    """A reward function raised or returned a non-number; names the record that caused it."""


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class PythonReward:
    """A registered reward function applied to every (prompt, completion) of a rollout."""

    def __init__(self, name: str):
        self.name = name
        self.fn = verifiable.get_reward_function(name)

    def __call__(self, records: Sequence[Mapping], prompts, completions, prompt_ids=None, completion_ids=None):
        out = np.zeros(len(records), np.float32)
        for i, (record, prompt, completion) in enumerate(zip(records, prompts, completions)):
            where = f"prompt {_short(prompt)!r}, completion {_short(completion)!r}"
            try:
                value = self.fn(prompt, completion, record)
            except Exception as e:  # noqa: BLE001 - any failure of user code stops the run in one line
                raise RewardFunctionError(f"reward function {self.name!r} raised {type(e).__name__}: "
                                          f"{one_line(str(e))} on {where}; fix the function or that record") from e
            try:
                value = float(value)
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value):
                raise RewardFunctionError(f"reward function {self.name!r} returned {value!r} on {where}; it must "
                                          "return a finite number")
            out[i] = value
        return out


@gin.configurable
def python_reward(name: str = gin.REQUIRED) -> PythonReward:
    """The registered reward function `name` (data/verifiable.py: 'arithmetic', 'word_count', ...)."""
    return PythonReward(name)


class RewardModelReward:
    """The scalar reward of a trained reward model for each prompt + completion."""

    def __init__(self, model, params):
        self.model, self.params = model, params
        self._score = jax.jit(lambda p, b: score_completions(model, p, b))

    def __call__(self, records, prompts, completions, prompt_ids, completion_ids):
        batch = self.model.scoring_batch([list(p) for p in prompt_ids], [list(c) for c in completion_ids])
        return np.asarray(self._score(self.params, batch), np.float32)


@gin.configurable
def reward_model_reward(model=gin.REQUIRED, checkpoint: str = gin.REQUIRED) -> RewardModelReward:
    """A `RewardModel` (gin: `reward_model_reward.model = @RewardModel()`) restored from `checkpoint`
    (a reward-model run's MODEL_DIR)."""
    from t5x_like.training.checkpointing import restore_model_params

    return RewardModelReward(model, restore_model_params(checkpoint, model))
