"""The reward model (models/reward_model.py) and its Bradley–Terry loss (objectives/reward.py):
parity with transformers' LlamaForSequenceClassification and TRL's RewardTrainer formula, training,
and starting from a decoder-only checkpoint's params."""

import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_like.models import (DecoderOnlyConfig, DecoderOnlyModel, ModelCapabilityError, RewardModel,
                             RewardModelConfig, model_for_config)
from t5x_like.models.reward_model import last_real_index
from t5x_like.objectives import PairwiseRewardLoss, RewardLossError, score_completions, summarize

VOCAB, LENGTH = 64, 12
# LLaMA-style and exportable (interop/hf_llama.can_export); tied so params_to_hf needs no lm_head.
TINY = dict(num_layers=2, vocab_size=VOCAB, d_model=32, num_heads=4, head_dim=8, num_kv_heads=2, mlp_dim=64,
            position_embedding="rotary", mlp_activations=("silu", "linear"), tie_embeddings=True,
            max_position_embeddings=64)


@functools.lru_cache(maxsize=None)
def tiny():
    model = model_for_config(RewardModelConfig(**TINY))
    params = model.init_variables(jax.random.key(0), pair_batch())["params"]
    # A head of the backbone's scale, so rewards differ visibly between rows.
    params = {**params, "reward_head": {"kernel": params["reward_head"]["kernel"] * 8.0}}
    return model, params


def pair_batch(prompt_lengths=(3, 5, 2), chosen=(4, 2, 6), rejected=(2, 5, 3), padding_pairs=1, seed=0):
    """Preference rows (prompt + completion, right-padded, tokens in [1, VOCAB)) with the loss on the
    completions' targets, as PreferenceFeatureConverter lays them out; then all-zero padding pairs."""
    rng = np.random.default_rng(seed)
    rows = 2 * (len(prompt_lengths) + padding_pairs)
    dec_in, dec_tgt = np.zeros((rows, LENGTH), np.int32), np.zeros((rows, LENGTH), np.int32)
    weights = np.zeros((rows, LENGTH), np.float32)
    for i, (p, c, r) in enumerate(zip(prompt_lengths, chosen, rejected)):
        prompt = rng.integers(1, VOCAB, p)
        for j, n in enumerate((c, r)):
            seq = np.concatenate([[1], prompt, rng.integers(1, VOCAB, n)])  # BOS 1, prompt, completion
            dec_in[2 * i + j, :len(seq) - 1], dec_tgt[2 * i + j, :len(seq) - 1] = seq[:-1], seq[1:]
            weights[2 * i + j, p:len(seq) - 1] = 1
    return {"decoder_input_tokens": dec_in, "decoder_target_tokens": dec_tgt, "decoder_loss_weights": weights}


def test_contract():
    model, params = tiny()
    assert isinstance(model, RewardModel) and not model.can_decode
    assert model.fresh_params_regex() == r"^reward_head/"
    pretrained, fresh = model.split_fresh_params(params)
    assert set(fresh) == {"reward_head"} and "reward_head" not in pretrained and "logits_dense" not in params
    assert params["reward_head"]["kernel"].shape == (TINY["d_model"], 1)
    assert model.logical_axes()["params"]["reward_head"]["kernel"] == jax.sharding.PartitionSpec("embed", "reward")
    with pytest.raises(ModelCapabilityError, match="PairwiseRewardLoss"):
        model.output_head(params)
    with pytest.raises(ModelCapabilityError, match="cannot generate"):
        model.prefill(params, np.ones((1, 2), np.int32), np.array([2]))
    lengths = model.feature_lengths({"inputs": 4, "targets": 8})
    assert lengths["decoder_input_tokens"] == 12 and "decoder_loss_weights" in lengths
    assert model.feature_converter(("inputs", "targets"), pack=True).pack is False
    decoder_only = DecoderOnlyModel(DecoderOnlyConfig(**TINY))
    dec_params = decoder_only.param_shapes()
    ours = model.flops_per_example(params, lengths)
    assert 0 < ours < decoder_only.flops_per_example(dec_params, lengths)
    # Gin builds it like any family.
    with gin.unlock_config():
        gin.parse_config("m/RewardModel.config = @RewardModelConfig()\nRewardModelConfig.num_layers = 1")
    try:
        assert gin.get_configurable("m/RewardModel")().config.num_layers == 1
    finally:
        gin.clear_config()


def test_pools_the_last_weighted_position():
    model, params = tiny()
    batch = pair_batch()
    index = last_real_index(jnp.asarray(batch["decoder_input_tokens"]), None,
                            jnp.asarray(batch["decoder_loss_weights"]))
    w = batch["decoder_loss_weights"]
    assert [int(i) for i in index] == [int(np.nonzero(r)[0].max()) if r.any() else 0 for r in w]
    rewards = np.asarray(score_completions(model, params, batch))
    # Tokens after that position (the final target fed as input, or anything else) change nothing.
    poked = {k: v.copy() for k, v in batch.items()}
    for row, i in enumerate(index[:6]):
        poked["decoder_input_tokens"][row, int(i) + 1:] = 7
    np.testing.assert_allclose(np.asarray(score_completions(model, params, poked)), rewards, rtol=1e-6)
    # model.score on a scoring_batch is the reward of (input, target) rows.
    inputs, targets = [[1, 5, 6], [1, 9]], [[3, 4, 2], [8, 2]]
    scored = np.asarray(model.score(params, model.scoring_batch(inputs, targets)))
    assert scored.shape == (2,) and np.all(np.isfinite(scored))


def _hf_reward_model(model, params):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from t5x_like.interop import hf_llama

    cfg = {k: v for k, v in hf_llama.config_to_hf(model.config).items() if k not in ("architectures", "model_type")}
    hf = transformers.LlamaForSequenceClassification(
        transformers.LlamaConfig(**cfg, num_labels=1, pad_token_id=0), ).eval()
    hf.config._attn_implementation = "eager"
    state = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in hf_llama.params_to_hf(params, model.config).items()}
    state["score.weight"] = torch.tensor(np.asarray(params["reward_head"]["kernel"], np.float32).T)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    return torch, hf


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_matches_transformers_and_trl_formula(margin):
    """Rewards, Bradley–Terry loss, accuracy and the head's gradient norm against transformers'
    LlamaForSequenceClassification (pad 0, right-padded, pooling the last non-pad token) and the
    loss of TRL's RewardTrainer.compute_loss, on the same weights; the padding pair counts for nothing."""
    model, params = tiny()
    batch = pair_batch()
    torch, hf = _hf_reward_model(model, params)

    real = 6  # three pairs, then one all-zero padding pair
    index = np.asarray(last_real_index(jnp.asarray(batch["decoder_input_tokens"]), None,
                                       jnp.asarray(batch["decoder_loss_weights"])))
    ids = batch["decoder_input_tokens"][:real].copy()
    for row in range(real):
        ids[row, index[row] + 1:] = 0  # HF reads the row up to the pooled position
    ids_t = torch.tensor(ids, dtype=torch.long)
    out = hf(input_ids=ids_t, attention_mask=(ids_t != 0).long()).logits[:, 0]
    r_c, r_r = out[0::2], out[1::2]
    ref_loss = -torch.nn.functional.logsigmoid(r_c - r_r - margin).mean()  # TRL's RewardTrainer
    ref_loss.backward()
    ref_loss = float(ref_loss.detach())
    ref_grad = float(hf.score.weight.grad.norm())
    ref_acc = float((r_c > r_r).float().mean())

    ours_rewards = np.asarray(score_completions(model, params, batch))
    np.testing.assert_allclose(ours_rewards[:real], out.detach().numpy(), atol=1e-4, rtol=1e-4)
    assert np.std(ours_rewards[:real]) > 0.1  # not a degenerate comparison

    loss = PairwiseRewardLoss(margin=margin)

    def mean_loss(p):
        sums = loss(model, p, batch)
        return sums["loss"] / sums["tokens"], sums

    grads, sums = jax.grad(mean_loss, has_aux=True)(params)
    metrics = summarize(jax.device_get(sums))
    assert metrics["tokens"] == 3
    assert abs(metrics["loss"] - ref_loss) < 1e-4
    assert abs(metrics["accuracy"] - ref_acc) < 1e-6
    np.testing.assert_allclose(metrics["margin"], float((r_c - r_r).mean().detach()), atol=1e-4)
    np.testing.assert_allclose(metrics["rewards/chosen"], float(r_c.mean().detach()), atol=1e-4)
    np.testing.assert_allclose(metrics["rewards/rejected"], float(r_r.mean().detach()), atol=1e-4)
    assert abs(float(jnp.linalg.norm(grads["reward_head"]["kernel"])) - ref_grad) < 1e-4
    # eval_sums reports the same pairwise loss as nll_sum.
    ev = jax.device_get(model.eval_sums(params, batch))
    assert ev["tokens"] == 3 and (margin or abs(ev["nll_sum"] / 3 - ref_loss) < 1e-4)


def test_odd_rows_and_non_reward_models_are_refused():
    model, params = tiny()
    batch = {k: v[:5] for k, v in pair_batch().items()}
    with pytest.raises(RewardLossError, match="even number of rows"):
        PairwiseRewardLoss()(model, params, batch)
    with pytest.raises(RewardLossError, match=r"\[rows, 1, 1\]"):
        lm = DecoderOnlyModel(DecoderOnlyConfig(**TINY))
        jax.eval_shape(lambda p: PairwiseRewardLoss()(lm, p, pair_batch()), lm.param_shapes())


def test_train_steps_raise_pairwise_accuracy():
    """A separable set: each pair is one sequence whose last read token is 5 in one row and 6 in the
    other; the token the fresh model ranks lower is made the chosen one, so it starts at accuracy 0."""
    from t5x_like.training.steps import train_step
    from t5x_like.training.train_state import TrainState

    model, _ = tiny()
    batch = pair_batch(prompt_lengths=(2, 3, 4, 2, 3, 4), chosen=(3, 2, 4, 2, 3, 2), rejected=(3, 2, 4, 2, 3, 2),
                       padding_pairs=0, seed=1)
    for k in batch:
        batch[k][1::2] = batch[k][0::2]
    index = np.asarray(last_real_index(batch["decoder_input_tokens"], None, batch["decoder_loss_weights"]))
    sgd = optax.sgd(0.5)
    state = TrainState.create(model, sgd, jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()})

    def mark(good, bad):
        rows = np.arange(len(index))
        batch["decoder_input_tokens"][rows, index] = np.where(rows % 2 == 0, good, bad)
        return summarize(jax.device_get(PairwiseRewardLoss()(model, state.params, batch)))

    if mark(5, 6)["accuracy"] > 0.5:
        mark(6, 5)
    before = summarize(jax.device_get(PairwiseRewardLoss()(model, state.params, batch)))
    assert before["accuracy"] <= 0.5
    step = jax.jit(functools.partial(train_step, model, sgd, loss=PairwiseRewardLoss(), dropout=False))
    for _ in range(8):
        state, metrics = step(state, batch)
    after = summarize(jax.device_get(PairwiseRewardLoss()(model, state.params, batch)))
    assert after["accuracy"] == 1.0 and after["accuracy"] > before["accuracy"], (before, after)
    assert after["loss"] < before["loss"]


def test_init_from_decoder_only_params_restores_the_backbone():
    """As train.init_checkpoint does: the decoder-only run's arrays fill the backbone (its
    logits_dense is not read), the head starts fresh, and the pooled hidden state is the decoder's."""
    model, fresh_init = tiny()
    sft = DecoderOnlyModel(DecoderOnlyConfig(**{**TINY, "tie_embeddings": False}))
    batch = pair_batch()
    sft_params = sft.init_variables(jax.random.key(42), batch)["params"]
    backbone_target, fresh = model.split_fresh_params(fresh_init)
    restored = jax.tree_util.tree_map(lambda _, x: x, backbone_target,
                                      {k: sft_params[k] for k in backbone_target})  # partial restore
    params = model.join_params(restored, fresh)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(fresh_init)
    np.testing.assert_array_equal(params["decoder"]["layers_0"]["mlp"]["wo"]["kernel"],
                                  sft_params["decoder"]["layers_0"]["mlp"]["wo"]["kernel"])
    hidden, _ = model.forward(params, batch, return_hidden=True)
    sft_hidden, _ = sft.forward(sft_params, batch, return_hidden=True)
    index = last_real_index(batch["decoder_input_tokens"], None, batch["decoder_loss_weights"])
    np.testing.assert_allclose(np.asarray(hidden[:, 0]), np.asarray(sft_hidden)[np.arange(len(index)), index],
                               rtol=1e-5, atol=1e-5)
    rewards = np.asarray(score_completions(model, params, batch))
    np.testing.assert_allclose(rewards, np.asarray(hidden[:, 0]) @ np.asarray(fresh["reward_head"]["kernel"])[:, 0],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["LlamaForSequenceClassification", "MistralForSequenceClassification"])
def test_hf_sequence_classifier_import_parity_and_round_trip(tmp_path, arch):
    """A random-weight transformers reward model (num_labels=1) imports as a RewardModel whose
    rewards equal HF's logits; exporting it gives a folder transformers reads with the same rewards."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from t5x_like.interop import hf, hf_llama_reward
    from t5x_like.interop.converter import HFInteropError

    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_labels=1, pad_token_id=0, tie_word_embeddings=False)
    config = (transformers.LlamaConfig(**common) if arch.startswith("Llama")
              else transformers.MistralConfig(**common, sliding_window=16))
    ref_model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    ref_model.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    model, variables = hf.load(str(tmp_path / "hf"))
    assert isinstance(model, RewardModel)

    ids = np.array([[5, 9, 14, 3, 7, 0, 0], [8, 2, 6, 11, 13, 4, 10], [3, 3, 0, 0, 0, 0, 0]], np.int32)

    def reference(m):
        with torch.no_grad():
            t = torch.tensor(ids, dtype=torch.long)
            return m(input_ids=t, attention_mask=(t != 0).long()).logits[:, 0].numpy()

    ref = reference(ref_model)
    ours = np.asarray(model.rewards(variables["params"], {"decoder_input_tokens": ids,
                                                          "decoder_target_tokens": ids}))
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-4)
    assert np.std(ref) > 1e-3

    hf.save(model, variables, str(tmp_path / "out"))
    reloaded = getattr(transformers, arch).from_pretrained(str(tmp_path / "out")).eval()
    assert reloaded.config.num_labels == 1 and reloaded.config.architectures == [arch]
    np.testing.assert_allclose(reference(reloaded), ref, atol=1e-6)

    with pytest.raises(HFInteropError, match="with 3 labels"):
        hf_llama_reward.config_from_hf({**config.to_dict(), "id2label": {"0": "a", "1": "b", "2": "c"}})
