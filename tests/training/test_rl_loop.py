"""The RLHF loop (inference/rlhf.py): a tiny GRPO run end to end, exact resume of GRPO and PPO, the
reference re-derived from its own checkpoint, and the one-line errors (a reward function that
raises, a reference of another architecture, the `rl` CLI mode)."""

import json
import os

import jax
import numpy as np
import optax
import pytest

from t5x_like.data import verifiable
from t5x_like.inference import rl_rollout, rlhf
from t5x_like.inference.rl_rewards import PythonReward, RewardFunctionError, python_reward
from t5x_like.models import DecoderOnlyConfig, model_for_config
from t5x_like.objectives.rl import POLICY, VALUE_HEAD, GRPOLoss, PPOLoss
from t5x_like.training import checkpointing

TINY = dict(vocab_size=384, d_model=32, num_heads=2, head_dim=16, mlp_dim=64, num_layers=2,
            position_embedding="rotary", norm_type="rms")


@verifiable.reward_function("test_high_bytes")
def _high_bytes_reward(prompt, completion, record):
    """A dense reward that varies between most samples of a random model (so GRPO's advantages are
    not all 0): how high the completion's bytes are, in [0, 1]."""
    data = completion.encode("utf-8", "replace")
    return sum(data) / (255.0 * len(data)) if data else 0.0


@verifiable.reward_function("test_raises")
def _raising_reward(prompt, completion, record):
    raise KeyError("answer")


def _model(lora=None):
    model = model_for_config(DecoderOnlyConfig(**TINY))
    return model if lora is None else type(model)(model.config, lora=lora)


def _run(model_dir, steps, loss=None, reward="test_high_bytes", model=None, **kw):
    args = dict(model=model or _model(), model_dir=str(model_dir), train_steps=steps,
                prompts=verifiable.arithmetic_prompts(count=40, max_operand=9), reward=python_reward(reward),
                loss=loss or GRPOLoss(), optimizer=optax.adam(3e-3), prompts_per_step=2, num_generations=4,
                max_prompt_length=6, max_new_tokens=4, progress=False, async_checkpoints=False, checkpoint_every=1)
    return rlhf.rl_train(**{**args, **kw})


def _rows(model_dir, split="train"):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def _params(model_dir):
    return checkpointing.restore_params(str(model_dir))


@pytest.mark.slow  # about 25 s on 2 idle cores (compiling the sampler, the scoring pass, the step)
def test_grpo_end_to_end(tmp_path):
    out = _run(tmp_path, 2, eval_prompts=verifiable.arithmetic_prompts("validation", count=4, max_operand=9))
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for name in ("reward", "reward_std", "kl", "entropy", "clip_ratio", "completion_length", "loss", "grad_norm",
                 "rollout_tokens_per_s", "train_tokens_per_s", "frac_reward_zero_std"):
        assert np.isfinite(rows[-1][name]), name
    assert 1 <= rows[-1]["completion_length"] <= 4 and 0 <= rows[-1]["reward"] <= 1
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first rollout's policy is the reference
    assert rows[-1]["kl"] > 1e-6                            # after one update it is not
    assert [r["step"] for r in _rows(tmp_path, "eval")] == [0, 2] and "eval" in out
    # The checkpoint holds the trained policy (not the start) and no reference or value head.
    saved = _params(tmp_path)
    assert set(saved) == {POLICY}
    start = _model().init_variables(jax.random.key(0))["params"]
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                                              saved[POLICY], start))
    assert max(leaves) > 0


def _assert_same_run(a, b, step):
    row_a = next(r for r in _rows(a) if r["step"] == step)
    row_b = next(r for r in _rows(b) if r["step"] == step)
    for k in ("reward", "loss", "kl", "entropy", "grad_norm", "clip_ratio", "completion_length"):
        if k in row_a:
            assert row_a[k] == row_b[k], k
    jax.tree_util.tree_map(np.testing.assert_array_equal, _params(a), _params(b))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_resume_is_exact(tmp_path, algorithm):
    """Two RL steps straight vs one step, then the same command resumed to two: identical metrics and
    params (policy, value head), since rollouts, prompts and minibatch orders derive from (seed, step)."""
    loss = GRPOLoss() if algorithm == "grpo" else PPOLoss()
    kw = dict(loss=loss, num_epochs=2, num_minibatches=2, prompts_per_step=4)  # minibatches of 8 rows: 8 devices
    _run(tmp_path / "straight", 2, **kw)
    _run(tmp_path / "resumed", 1, **kw)
    _run(tmp_path / "resumed", 2, **kw)
    assert [r["step"] for r in _rows(tmp_path / "resumed")] == [1, 2]
    _assert_same_run(tmp_path / "straight", tmp_path / "resumed", 2)
    assert (VALUE_HEAD in _params(tmp_path / "straight")) == (algorithm == "ppo")


@pytest.mark.slow
def test_grpo_raises_a_dense_reward(tmp_path):
    """Learning signal, not just plumbing: GRPO moves a tiny random policy toward high bytes (sampled
    at temperature 2: the random init's logits are sharp)."""
    _run(tmp_path, 12, prompts_per_step=4, optimizer=optax.adam(1e-2), checkpoint_every=100,
         loss=GRPOLoss(temperature=2.0))
    rewards = [r["reward"] for r in _rows(tmp_path)]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.08, rewards  # measured: 0.18 -> 0.30


@pytest.mark.slow
def test_reference_is_re_derived_from_its_checkpoint(tmp_path):
    """KL is measured against reference_checkpoint: from the start's own checkpoint it is 0 at the
    first rollout; from another checkpoint of the same model it is not."""
    start = _model().init_variables(jax.random.key(0))["params"]
    other = _model().init_variables(jax.random.key(7))["params"]
    checkpointing.save_params(checkpointing.checkpoints_dir(str(tmp_path / "start")), 0, start)
    checkpointing.save_params(checkpointing.checkpoints_dir(str(tmp_path / "other")), 0, other)
    _run(tmp_path / "a", 1, init_checkpoint=str(tmp_path / "start"))
    _run(tmp_path / "b", 1, init_checkpoint=str(tmp_path / "start"), reference_checkpoint=str(tmp_path / "other"))
    assert _rows(tmp_path / "a")[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert _rows(tmp_path / "b")[0]["kl"] > 0.01


@pytest.mark.slow
def test_lora_grpo_trains_adapters_against_the_adapters_off_reference(tmp_path):
    """With LoRA the reference is the policy with its adapters off (no second copy): KL 0 at the first
    rollout (adapters start as a no-op), and only the adapters change."""
    from flax import traverse_util

    from t5x_like.layers.lora import LoraConfig

    _run(tmp_path, 2, model=_model(LoraConfig(rank=2, alpha=4.0)), keep_last=2, optimizer=optax.adam(1e-2))
    rows = _rows(tmp_path)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[1]["kl"] > 1e-6
    first, second = (traverse_util.flatten_dict(checkpointing.restore_params(str(tmp_path), step=s)[POLICY],
                                                sep="/") for s in (1, 2))
    changed = {k for k in first if not np.array_equal(first[k], second[k])}
    assert changed and all(k.endswith("lora_a") or k.endswith("lora_b") for k in changed), sorted(changed)


def test_reward_function_that_raises_names_the_record():
    reward = PythonReward("test_raises")
    with pytest.raises(RewardFunctionError) as e:
        reward([{"prompt": "1+2=", "answer": "3"}], ["1+2="], ["3 apples"])
    message = str(e.value)
    assert "\n" not in message
    assert "'test_raises' raised KeyError" in message and "'1+2='" in message and "'3 apples'" in message
    verifiable.reward_function("test_nan")(lambda p, c, r: float("nan"))
    with pytest.raises(RewardFunctionError, match="'test_nan' returned nan on prompt 'x', completion 'y'"):
        PythonReward("test_nan")([{"prompt": "x"}], ["x"], ["y"])


@pytest.mark.slow
def test_reward_function_that_raises_stops_the_run(tmp_path):
    with pytest.raises(RewardFunctionError, match=r"'test_raises' raised KeyError: 'answer' on prompt '\d+\+\d+='"):
        _run(tmp_path, 1, reward="test_raises")
    assert not os.path.exists(checkpointing.checkpoints_dir(str(tmp_path))) or \
        not os.listdir(checkpointing.checkpoints_dir(str(tmp_path)))


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(verifiable.VerifiableTaskError, match="no reward function named 'nope'"):
        python_reward("nope")
    with pytest.raises(rlhf.RLRunError, match="num_generations must be at least 2"):
        _run(tmp_path, 1, num_generations=1)
    with pytest.raises(rlhf.RLRunError, match="do not split into num_minibatches=3"):
        _run(tmp_path, 1, num_minibatches=3)
    with pytest.raises(rlhf.RLRunError, match="over max_prompt_length=2"):
        _run(tmp_path, 1, max_prompt_length=2)


@pytest.mark.slow
def test_reference_of_another_architecture_is_refused(tmp_path):
    other = model_for_config(DecoderOnlyConfig(**{**TINY, "d_model": 48, "head_dim": 24}))
    checkpointing.save_params(checkpointing.checkpoints_dir(str(tmp_path / "other")), 0,
                              other.init_variables(jax.random.key(0))["params"])
    with pytest.raises(rlhf.RLRunError, match="reference_checkpoint=.* does not restore onto the policy"):
        _run(tmp_path / "run", 1, reference_checkpoint=str(tmp_path / "other"))


def test_cli_rl_mode_reports_a_bad_reward_name_in_one_line(tmp_path, capsys):
    from t5x_like import main

    status = main.main(["rl", "--gin_file=models/llama_tiny.gin", "--gin_file=runs/grpo.gin",
                        f"--gin.MODEL_DIR='{tmp_path}'", "--gin.REWARD_FUNCTION='nope'"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith("error: no reward function named 'nope'"), err


def test_prompts_render_with_the_sft_chat_template():
    """With chat_template the policy reads the prompt as its SFT data laid it out (a user turn plus the
    generation prompt, data/chat_templates.py); without, the text as is. BOS 0 first (byte vocabulary)."""
    from t5x_like.data.chat_templates import get_template
    from t5x_like.data.vocabularies import get_vocabulary

    vocab, model = get_vocabulary("byte"), _model()
    records = [{"prompt": "1+2=", "answer": "3"}]
    plain = rl_rollout.Prompts(model, vocab, records, 64, "p", get_template("plain"))
    assert plain.ids["1+2="] == [0] + list(vocab.encode("<|user|>\n1+2=\n<|assistant|>\n"))
    raw = rl_rollout.Prompts(model, vocab, records, 64, "p")
    arr, lengths, rows = raw.arrays(records, 3)
    assert rows == [[0] + list(vocab.encode("1+2="))] * 3 and arr.shape == (3, 64) and list(lengths) == [5] * 3


def test_arithmetic_splits_are_disjoint_and_rewards_parse():
    train = verifiable.arithmetic_prompts("train", count=5000, max_operand=50)
    held_out = verifiable.arithmetic_prompts("validation", count=5000, max_operand=50)
    assert len(train) > 1500 and len(held_out) > 150
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert verifiable.arithmetic_prompts("train", count=10, max_operand=50) == train[:10]  # a prefix: same order
    reward = verifiable.get_reward_function("arithmetic")
    assert reward("12+7=", " 19 and more", {"answer": "19"}) == 1.0
    assert reward("12+7=", "191", {"answer": "19"}) == 0.0 and reward("12+7=", "x", {"answer": "19"}) == 0.0
    assert verifiable.get_reward_function("word_count")("", "a b c", {"words": 4}) == 0.75


def test_prompts_for_step_is_a_function_of_the_step():
    records = [{"prompt": str(i)} for i in range(5)]
    first = [r["prompt"] for s in (1, 2, 3) for r in verifiable.prompts_for_step(records, s, 2, seed=3)]
    assert sorted(first[:5]) == [str(i) for i in range(5)]  # one pass visits every prompt once
    assert verifiable.prompts_for_step(records, 2, 2, seed=3) == verifiable.prompts_for_step(records, 2, 2, seed=3)


def test_reward_model_reward_scores_prompt_plus_completion(tmp_path):
    """`reward_model_reward` restores a RewardModel run and scores each prompt + completion (EOS
    included, as its preference pairs were) where the model reads the last completion token."""
    from t5x_like.inference.rl_rewards import reward_model_reward
    from t5x_like.models.reward_model import RewardModel, RewardModelConfig

    model = RewardModel(RewardModelConfig(**TINY))
    params = model.init_variables(jax.random.key(5))["params"]
    params["reward_head"]["kernel"] = params["reward_head"]["kernel"] + 0.5  # a head that is not ~0
    checkpointing.save_params(str(tmp_path / "rm"), 0, params)
    reward = reward_model_reward(model=model, checkpoint=str(tmp_path / "rm"))
    prompts, completions = [[5, 6, 7], [5, 6, 7], [9]], [[8, 9, 1], [40, 41, 42, 1], [3, 1]]
    got = reward([{}] * 3, ["p"] * 3, ["c"] * 3, prompts, completions)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        alone = np.asarray(p + c[:-1], np.int32)[None]  # the row up to its last real token, no weights
        expected = float(model.rewards(params, {"decoder_input_tokens": alone})[0])
        np.testing.assert_allclose(got[row], expected, rtol=1e-5, atol=1e-5)
    assert abs(got[0] - got[1]) > 1e-4
