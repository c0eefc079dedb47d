"""Train/eval steps on tiny models: microbatching equivalence, learning, metrics, NaN detection."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_like.models import DecoderOnlyConfig, EncoderDecoderConfig, EncoderOnlyConfig, model_for_config
from t5x_like.training import optimizers
from t5x_like.objectives import CrossEntropyLoss
from t5x_like.training.steps import make_train_step, split_microbatches, train_step
from t5x_like.training.train_state import TrainState

VOCAB, BATCH, LENGTH = 64, 8, 16
TINY = dict(vocab_size=VOCAB, d_model=32, num_heads=4, head_dim=8, mlp_dim=64)


def _model(kind, **kw):
    if kind == "decoder_only":  # GPT-2-like: biases and LayerNorm exercise every param kind
        cfg = DecoderOnlyConfig(num_layers=2, norm_type="layer", use_bias=True, position_embedding="learned",
                                max_position_embeddings=LENGTH, **TINY)
    elif kind == "encoder_decoder":
        cfg = EncoderDecoderConfig(num_encoder_layers=2, num_decoder_layers=2, relative_num_buckets=8,
                                   relative_max_distance=16, mlp_activations=("gelu_tanh", "linear"),
                                   tie_embeddings=False, **TINY)
    else:
        cfg = EncoderOnlyConfig(num_layers=2, position_embedding="learned", max_position_embeddings=LENGTH,
                                norm_type="layer", norm_position="post", use_bias=True, **TINY)
    return model_for_config(cfg.replace(**kw))


def _tokens(rng, min_len=3):
    """Rows of random ids with very different amounts of padding, so per-microbatch token counts differ."""
    lengths = np.linspace(min_len, LENGTH, BATCH).astype(int)
    tokens = rng.integers(2, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    tokens[np.arange(LENGTH)[None, :] >= lengths[:, None]] = 0
    return tokens


def _shift(targets):
    return np.pad(targets[:, :-1], ((0, 0), (1, 0)))


def _batch(kind, seed=0):
    rng = np.random.default_rng(seed)
    targets = _tokens(rng)
    if kind == "encoder_only":
        inputs = _tokens(rng, LENGTH)
        weights = (rng.random((BATCH, LENGTH)) < 0.3).astype(np.float32)
        return {"encoder_input_tokens": inputs, "encoder_target_tokens": inputs, "encoder_loss_weights": weights}
    batch = {"decoder_input_tokens": _shift(targets), "decoder_target_tokens": targets,
             "decoder_loss_weights": (targets > 0).astype(np.float32)}
    if kind == "encoder_decoder":
        batch["encoder_input_tokens"] = _tokens(rng, 5)
    return batch


def _sgd(lr=0.5):
    """Plain SGD: the update is the gradient itself, so any normalisation error shows in the params."""
    return optimizers.Optimizer(optax.sgd(lr), optax.constant_schedule(lr))


def _state(model, opt, batch, seed=0):
    return TrainState.create(model, opt, jax.random.PRNGKey(seed), {k: v.shape for k, v in batch.items()})


@functools.lru_cache(maxsize=None)
def _setup(kind, **model_kw):
    """(model, SGD, batch, state, step factory) per family, shared so each step shape compiles once."""
    model, opt, batch = _model(kind, **model_kw), _sgd(), _batch(kind)

    @functools.lru_cache(maxsize=None)
    def step(**kw):
        return jax.jit(functools.partial(train_step, model, opt, **kw))
    return model, opt, batch, _state(model, opt, batch), step


REGULARISED = dict(loss=CrossEntropyLoss(z_loss=1e-3, label_smoothing=0.1))


@pytest.mark.parametrize("kind,ks", [("decoder_only", (2, 4)), ("encoder_decoder", (2, 4))])
def test_microbatches_match_full_batch(kind, ks):
    model, _, batch, state, step = _setup(kind)
    ref_state, ref = step(**REGULARISED)(state, batch)
    for k in ks:
        new_state, got = step(num_microbatches=k, **REGULARISED)(state, batch)
        for name in ("loss", "nll_sum", "z_loss", "tokens", "correct", "grad_norm"):
            np.testing.assert_allclose(got[name], ref[name], rtol=2e-5, atol=1e-6, err_msg=f"k={k} {name}")
        for a, b in zip(jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(ref_state.params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=f"k={k}")
        assert int(new_state.step) == 1


@pytest.mark.parametrize("kind", ["decoder_only", "encoder_decoder", "encoder_only"])
def test_eval_excludes_z_loss_and_label_smoothing(kind):
    model, _, batch, state, step = _setup(kind)
    _, train = step(**REGULARISED)(state, batch)
    evaluated = jax.jit(model.eval_sums)(state.params, batch)
    assert set(evaluated) == {"nll_sum", "tokens", "correct"}
    for name in evaluated:  # the train metrics were taken on the same params before the update
        np.testing.assert_allclose(evaluated[name], train[name], rtol=1e-6)
    assert float(train["z_loss"]) > 0
    assert abs(float(train["loss"]) - float(evaluated["nll_sum"] / evaluated["tokens"])) > 1e-2


def test_split_microbatches_is_strided_and_checks_divisibility():
    batch = {"x": np.arange(8)[:, None] * np.ones((1, 3), np.int32)}
    micro = split_microbatches(batch, 4)["x"]
    assert micro.shape == (4, 2, 3)
    np.testing.assert_array_equal(micro[1, :, 0], [1, 5])
    with pytest.raises(ValueError, match="divisible by num_microbatches=3"):
        split_microbatches(batch, 3)
    # Examples of two consecutive rows (DPO's chosen/rejected pairs) stay whole: pairs 1 and 3.
    pairs = split_microbatches(batch, 2, rows_per_example=2)["x"]
    np.testing.assert_array_equal(pairs[1, :, 0], [2, 3, 6, 7])


@pytest.mark.parametrize("make_opt", [
    lambda: optimizers.adamw(peak_learning_rate=1e-2, warmup_steps=5, decay_steps=100),
    lambda: optimizers.adafactor(warmup_steps=100, min_dim_size_to_factor=16),
], ids=["adamw", "adafactor"])
def test_loss_decreases_on_a_fixed_batch(make_opt):
    model, opt, batch = _model("decoder_only"), make_opt(), _batch("decoder_only")
    state = _state(model, opt, batch)
    step = make_train_step(model, opt)
    losses = []
    for i in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        assert bool(metrics["is_finite"])
        assert float(metrics["learning_rate"]) == pytest.approx(float(opt.schedule(i)))
    assert int(state.step) == 30
    assert losses[-1] < 0.6 * losses[0], losses


def test_nan_params_are_reported_not_hidden():
    _, _, batch, state, step = _setup("decoder_only")
    assert bool(step(**REGULARISED)(state, batch)[1]["is_finite"])
    params = jax.tree_util.tree_map(lambda x: x, state.params)
    params["decoder"]["final_norm"]["scale"] = params["decoder"]["final_norm"]["scale"].at[3].set(jnp.nan)
    _, metrics = step(**REGULARISED)(state.replace(params=params), batch)
    assert not bool(metrics["is_finite"])


def test_dropout_rng_is_per_step_and_reproducible():
    _, _, batch, state, step = _setup("decoder_only", dropout_rate=0.3)
    a, b = step()(state, batch)[1]["loss"], step()(state, batch)[1]["loss"]
    assert float(a) == float(b)  # same state, same masks
    later = state.replace(step=state.step + 1)
    assert float(step()(later, batch)[1]["loss"]) != float(a)  # the step number is folded into the dropout rng


def test_abstract_state_matches_created_state():
    model, opt, batch = _model("decoder_only"), optimizers.adafactor(min_dim_size_to_factor=16), _batch("decoder_only")
    shapes = {k: v.shape for k, v in batch.items()}
    state = TrainState.create(model, opt, jax.random.key(0), shapes)  # typed keys are stored as raw key data
    abstract = TrainState.abstract(model, opt, shapes)
    same = jax.tree_util.tree_map(lambda x, s: x.shape == s.shape and x.dtype == s.dtype, state, abstract)
    assert all(jax.tree_util.tree_leaves(same))
    assert int(state.step) == 0 and state.rng.dtype == jnp.uint32
