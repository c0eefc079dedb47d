"""Cross-entropy sums against a float64 numpy recomputation, and the batch -> targets mapping."""

import jax
import numpy as np
import pytest

from t5x_like.models import DecoderOnlyConfig, EncoderDecoderConfig, EncoderOnlyConfig, model_for_config
from t5x_like.objectives import cross_entropy_sums, loss_normalizer

TINY = dict(vocab_size=64, d_model=32, num_heads=4, head_dim=8, mlp_dim=64)


def _reference(logits, targets, weights, ls, z):
    """Explicit soft targets and one-hots in float64."""
    logits = logits.astype(np.float64)
    vocab = logits.shape[-1]
    log_z = np.log(np.sum(np.exp(logits), axis=-1))
    log_probs = logits - log_z[..., None]
    onehot = np.eye(vocab)[targets]
    soft = onehot * (1 - ls) + (1 - onehot) * ls / (vocab - 1)
    entropy = -np.sum(np.where(soft > 0, soft * np.log(np.maximum(soft, 1e-30)), 0.0), axis=-1)
    ce = -np.sum(soft * log_probs, axis=-1) - entropy
    nll = -np.sum(onehot * log_probs, axis=-1)
    zl = z * log_z ** 2
    correct = (np.argmax(logits, -1) == targets)
    return {"loss": np.sum((ce + zl) * weights), "nll_sum": np.sum(nll * weights), "z_loss": np.sum(zl * weights),
            "tokens": np.sum(weights), "correct": np.sum(correct * weights)}


@pytest.mark.parametrize("ls,z", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
def test_sums_match_float64_reference(ls, z):
    rng = np.random.default_rng(0)
    logits = (3 * rng.standard_normal((4, 6, 11))).astype(np.float32)
    targets = rng.integers(0, 11, (4, 6)).astype(np.int32)
    weights = (rng.random((4, 6)) * (targets > 0)).astype(np.float32)
    got = cross_entropy_sums(logits, targets, weights, label_smoothing=ls, z_loss=z)
    ref = _reference(logits, targets, weights, ls, z)
    for k in ref:
        np.testing.assert_allclose(float(got[k]), ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
    loss = got["loss"] / loss_normalizer(got)
    np.testing.assert_allclose(float(loss), ref["loss"] / ref["tokens"], rtol=1e-5)


def test_default_weights_skip_padding():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    targets = np.array([[3, 4, 0, 0, 0], [1, 2, 3, 4, 0]], np.int32)
    got = cross_entropy_sums(logits, targets)
    ref = _reference(logits, targets, (targets > 0).astype(np.float64), 0.0, 0.0)
    assert float(got["tokens"]) == 6
    np.testing.assert_allclose(float(got["nll_sum"]), ref["nll_sum"], rtol=1e-5)


def test_perfect_prediction_with_smoothing_costs_nothing():
    vocab, ls = 9, 0.1
    targets = np.array([[1, 5, 8]], np.int32)
    soft = np.full((1, 3, vocab), ls / (vocab - 1))
    soft[0, np.arange(3), targets[0]] = 1 - ls
    sums = cross_entropy_sums(np.log(soft).astype(np.float32), targets, label_smoothing=ls)
    assert abs(float(sums["loss"])) < 1e-5
    assert float(sums["nll_sum"]) == pytest.approx(-3 * np.log(1 - ls), rel=1e-5)  # NLL ignores smoothing


def test_normalizers():
    sums = {"loss": np.float32(12.0), "tokens": np.float32(4.0)}
    assert float(loss_normalizer(sums)) == 4.0
    assert float(loss_normalizer(sums, None)) == 1.0
    assert float(loss_normalizer(sums, 1024.0)) == 1024.0
    assert float(loss_normalizer({"tokens": np.float32(0.0)})) == 1.0  # an all-padding batch gives loss 0, not NaN
    with pytest.raises(ValueError, match="loss_normalizing_factor"):
        loss_normalizer(sums, "per_sequence")


def test_targets_and_weights_per_family():
    t = np.array([[5, 6, 0]], np.int32)
    w = np.array([[1.0, 0.5, 0.0]], np.float32)
    dec = model_for_config(DecoderOnlyConfig(num_layers=1, **TINY))
    encdec = model_for_config(EncoderDecoderConfig(num_encoder_layers=1, num_decoder_layers=1, **TINY))
    enc = model_for_config(EncoderOnlyConfig(num_layers=1, **TINY))
    for model in (dec, encdec):
        assert (model.targets_feature, model.weights_feature) == ("decoder_target_tokens", "decoder_loss_weights")
        targets, weights = model.targets_and_weights({"decoder_target_tokens": t, "decoder_loss_weights": w})
        np.testing.assert_array_equal(targets, t)
        np.testing.assert_array_equal(weights, w)
        _, weights = model.targets_and_weights({"decoder_target_tokens": t})
        np.testing.assert_array_equal(weights, [[1, 1, 0]])
    targets, weights = enc.targets_and_weights({"encoder_target_tokens": t, "encoder_loss_weights": w,
                                                 "decoder_target_tokens": t * 0})
    np.testing.assert_array_equal(targets, t)
    np.testing.assert_array_equal(weights, w)
    with pytest.raises(KeyError, match="encoder_target_tokens"):
        enc.targets_and_weights({"decoder_target_tokens": t})


def test_uniform_logits_give_perplexity_equal_to_vocab():
    """All-zero weights make every logit 0: NLL = log V per token, so perplexity = V."""
    model = model_for_config(DecoderOnlyConfig(num_layers=2, **TINY))
    params = jax.tree_util.tree_map(np.zeros_like, model.init_variables(jax.random.PRNGKey(0))["params"])
    tokens = np.random.default_rng(0).integers(2, 64, (8, 16)).astype(np.int32)
    tokens[:, 12:] = 0
    batch = {"decoder_input_tokens": np.pad(tokens[:, :-1], ((0, 0), (1, 0))), "decoder_target_tokens": tokens,
             "decoder_loss_weights": (tokens > 0).astype(np.float32)}
    sums = jax.jit(model.eval_sums)(params, batch)
    assert float(sums["tokens"]) == 8 * 12
    assert np.exp(float(sums["nll_sum"]) / float(sums["tokens"])) == pytest.approx(64, rel=1e-5)
