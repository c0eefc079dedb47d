"""Frozen parameters (training/trainable.py): only the selected ones train, with state only for them."""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from t5x_like.models import DecoderOnlyConfig, model_for_config
from t5x_like.training import optimizers
from t5x_like.training.steps import train_step
from t5x_like.training.train_state import TrainState
from t5x_like.training.trainable import TrainableParamsError, TrainableSubset, trainable_subset

VOCAB, BATCH, LENGTH = 64, 4, 12


def _setup():
    model = model_for_config(DecoderOnlyConfig(vocab_size=VOCAB, d_model=32, num_heads=4, head_dim=8, mlp_dim=64,
                                               num_layers=2, tie_embeddings=False))
    rng = np.random.default_rng(0)
    targets = rng.integers(2, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    batch = {"decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))), "decoder_target_tokens": targets,
             "decoder_loss_weights": np.ones((BATCH, LENGTH), np.float32)}
    return model, batch


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _run(model, batch, opt, num_microbatches=1):
    state = TrainState.create(model, opt, jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()})
    step = jax.jit(functools.partial(train_step, model, opt, num_microbatches=num_microbatches, dropout=False))
    new, _ = step(state, batch)
    return state, new


@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_only_matching_params_train_and_frozen_stay_bitwise(num_microbatches):
    model, batch = _setup()
    sgd = optimizers.Optimizer(optax.sgd(0.5), optax.constant_schedule(0.5))
    pattern = r"logits_dense/|layers_1/mlp/"
    before, after = _run(model, batch, trainable_subset(sgd, pattern), num_microbatches)
    _, full = _run(model, batch, sgd, num_microbatches)
    b, a, f = _flat(before.params), _flat(after.params), _flat(full.params)
    trained = [p for p in b if TrainableSubset(sgd, pattern).is_trainable(p)]
    assert sorted(trained) == ["decoder/layers_1/mlp/wi/kernel", "decoder/layers_1/mlp/wo/kernel",
                               "logits_dense/kernel"]
    for path in b:
        if path in trained:  # same gradient as a full run's (plain SGD: the update is the gradient)
            assert not np.array_equal(a[path], b[path])
            np.testing.assert_allclose(a[path], f[path], rtol=1e-5, atol=1e-7)
        else:
            assert a[path].tobytes() == b[path].tobytes(), path


def test_optimizer_state_holds_only_trainable_leaves():
    model, batch = _setup()
    adam = optimizers.Optimizer(optax.adam(1e-3), optax.constant_schedule(1e-3))
    state = TrainState.create(model, trainable_subset(adam, "logits_dense/"), jax.random.PRNGKey(0),
                              {k: v.shape for k, v in batch.items()})
    moments = [x for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x) > 0]
    assert sorted(x.shape for x in moments) == [(32, VOCAB), (32, VOCAB)]  # mu and nu of the head


def test_patterns_that_select_nothing_or_are_not_regexes_are_user_errors():
    model, _ = _setup()
    params = model.param_shapes()
    with pytest.raises(TrainableParamsError, match="matches no parameter; paths look like"):
        TrainableSubset(optax.sgd(1.0), "lm_head").check(params)
    with pytest.raises(TrainableParamsError, match="is not a regular expression"):
        TrainableSubset(optax.sgd(1.0), "layers_(")
    TrainableSubset(optax.sgd(1.0), "norm").check(params)
