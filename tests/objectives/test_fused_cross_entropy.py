"""The fused, chunked cross-entropy equals the plain one on materialised logits: sums and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like import models as base
from t5x_like.models.config import DecoderOnlyConfig, EncoderDecoderConfig, EncoderOnlyConfig
from t5x_like.objectives import CrossEntropyLoss, OutputHead, SUM_KEYS
from t5x_like.objectives import cross_entropy as losses
from t5x_like.objectives import fused_cross_entropy as fused_loss

SMALL = dict(vocab_size=97, d_model=32, num_heads=4, head_dim=8, mlp_dim=64)
MODELS = {
    "decoder_untied": lambda: base.DecoderOnlyModel(DecoderOnlyConfig(num_layers=2, tie_embeddings=False,
                                                                       position_embedding="rotary", **SMALL)),
    "decoder_tied_scaled": lambda: base.DecoderOnlyModel(DecoderOnlyConfig(num_layers=2, tie_embeddings=True,
                                                                           scale_tied_logits=True, **SMALL)),
    "bert_bias": lambda: base.EncoderOnlyModel(EncoderOnlyConfig(num_layers=2, position_embedding="learned",
                                                                 norm_type="layer", use_bias=True, **SMALL)),
    "encoder_decoder": lambda: base.EncoderDecoderModel(EncoderDecoderConfig(num_encoder_layers=2,
                                                                             num_decoder_layers=2, **SMALL)),
}


def _batch(model, rng, b=3, length=12):
    tokens = rng.integers(1, SMALL["vocab_size"], (b, length)).astype(np.int32)
    targets = rng.integers(1, SMALL["vocab_size"], (b, length)).astype(np.int32)
    weights = (rng.random((b, length)) < 0.7).astype(np.float32)
    if isinstance(model, base.EncoderOnlyModel):
        return {"encoder_input_tokens": tokens, "encoder_target_tokens": targets, "encoder_loss_weights": weights}
    batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": targets, "decoder_loss_weights": weights}
    if isinstance(model, base.EncoderDecoderModel):
        batch["encoder_input_tokens"] = tokens[:, ::-1].copy()
    return batch


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("z_loss,label_smoothing", [(0.0, 0.0), (1e-3, 0.1)])
def test_fused_equals_materialised_logits(name, z_loss, label_smoothing):
    model = MODELS[name]()
    batch = _batch(model, np.random.default_rng(0))
    params = model.init_variables(jax.random.key(0), batch)["params"]
    results = {}
    for fused in (False, True):
        loss_fn = CrossEntropyLoss(z_loss=z_loss, label_smoothing=label_smoothing, fused=fused)
        grads = jax.grad(lambda p: loss_fn(model, p, batch)["loss"])(params)
        sums = loss_fn(model, params, batch)
        results[fused] = (sums, grads)
    (plain, plain_grads), (fused, fused_grads) = results[False], results[True]
    for key in SUM_KEYS:
        np.testing.assert_allclose(fused[key], plain[key], rtol=1e-5, atol=1e-5, err_msg=key)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(plain_grads))
    for (path, g_plain), g_fused in zip(jax.tree_util.tree_leaves_with_path(plain_grads),
                                        jax.tree_util.tree_leaves(fused_grads)):
        np.testing.assert_allclose(g_fused, g_plain, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_chunks_add_up_and_only_loss_is_differentiable():
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.standard_normal((2, 8, 16)), jnp.float32)
    head = OutputHead(jnp.asarray(rng.standard_normal((16, 50)), jnp.float32))
    targets = rng.integers(0, 50, (2, 8))
    weights = np.ones((2, 8), np.float32)
    logits = jnp.einsum("bld,dv->blv", hidden, head.weight)
    expected = losses.cross_entropy_sums(logits, targets, weights, z_loss=1e-4)
    for chunk in (1, 2, 8):
        got = fused_loss.fused_cross_entropy_sums(hidden, head, targets, weights, z_loss=1e-4, chunk=chunk)
        for key in SUM_KEYS:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, err_msg=f"{key} chunk={chunk}")
    grad = jax.grad(lambda h: fused_loss.fused_cross_entropy_sums(h, head, targets, weights)["nll_sum"])(hidden)
    assert not np.any(np.asarray(grad))  # statistics are gradient-stopped
    with pytest.raises(ValueError, match="does not divide"):
        fused_loss.fused_cross_entropy_sums(hidden, head, targets, weights, chunk=3)


def test_first_argmax_matches_argmax_on_ties():
    logits = jnp.asarray([[[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    np.testing.assert_array_equal(fused_loss._first_argmax(logits, jnp.max(logits, -1)), jnp.argmax(logits, -1))


def test_chunk_length_divides_and_fits():
    assert fused_loss.chunk_length(512, 8, 32768) == 64
    assert fused_loss.chunk_length(7, 1, 10) == 7
    assert fused_loss.chunk_length(12, 64, 2 ** 20) == 1


def test_compact_capacities_round_to_wide_chunks():
    assert fused_loss.compact_capacities(512, (0.25, 0.5)) == (128, 256)
    assert fused_loss.compact_capacities(40, (0.25, 0.5)) == (16, 24)
    assert fused_loss.compact_capacities(8, (0.25, 0.5)) == (2, 4)
    assert fused_loss.compact_capacities(8, (1.0, 0.0)) == ()


def _weights_with_row_counts(counts, length, rng):
    weights = np.zeros((len(counts), length), np.float32)
    for row, n in enumerate(counts):
        weights[row, rng.choice(length, n, replace=False)] = rng.uniform(0.5, 2.0, n)
    return weights


@pytest.mark.parametrize("counts,branch", [((5, 16, 0), 0), ((17, 3, 24), 1), ((2, 25, 9), 2), ((40, 40, 40), 2)])
def test_compact_paths_equal_the_full_length(counts, branch):
    """Rows whose weighted positions fit a capacity take the gathered path: same sums and gradients."""
    rng = np.random.default_rng(len(counts) + branch)
    length, vocab = 40, 53
    hidden = jnp.asarray(rng.standard_normal((3, length, 16)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal((16, vocab)) * 0.3, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(vocab), jnp.float32)
    targets = rng.integers(0, vocab, (3, length))
    weights = _weights_with_row_counts(counts, length, rng)
    caps = fused_loss.compact_capacities(length, fused_loss.COMPACT_FRACTIONS)
    assert caps == (16, 24) and int(fused_loss.compact_branch(weights, caps)) == branch

    def plain(h, w, b):
        sums = losses.cross_entropy_sums(jnp.einsum("bld,dv->blv", h, w) + b, targets, weights,
                                         z_loss=1e-3, label_smoothing=0.1)
        return sums["loss"], sums

    def fused(h, w, b, fractions):
        sums = fused_loss.fused_cross_entropy_sums(h, OutputHead(w, b), targets, weights, z_loss=1e-3,
                                                   label_smoothing=0.1, compact_fractions=fractions)
        return sums["loss"], sums

    grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))(hidden, weight, bias)  # noqa: E731
    expected_grads, expected = grad(plain)
    for fractions in (fused_loss.COMPACT_FRACTIONS, ()):
        grads, got = grad(functools.partial(fused, fractions=fractions))
        for key in SUM_KEYS:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-5, err_msg=key)
        for name, g, e in zip(("hidden", "weight", "bias"), grads, expected_grads):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5, err_msg=f"{name} {fractions}")
