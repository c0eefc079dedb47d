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


def test_lora_training_changes_only_adapters_and_keeps_state_for_them_alone():
    """A LoRA model's default trainable set (model.trainable_params_regex) through the real step:
    every base weight bitwise unchanged, the optimizer moments exactly the adapters'."""
    from t5x_like.layers.lora import LoraConfig

    base, batch = _setup()
    model = type(base)(base.config, lora=LoraConfig(rank=4, targets="all-linear"))
    adam = optimizers.Optimizer(optax.adam(1e-2), optax.constant_schedule(1e-2))
    opt = trainable_subset(adam, model.trainable_params_regex())
    before, after = _run(model, batch, opt)
    b, a = _flat(before.params), _flat(after.params)
    adapters = [p for p in b if p.endswith(("/lora_a", "/lora_b"))]
    assert len(adapters) == 2 * 6 * 2  # 2 layers x (query, key, value, out, wi, wo) x (A, B)
    for path in b:
        if path.endswith("/lora_a"):  # B starts at zero, so only B moves on the first step
            assert a[path].tobytes() == b[path].tobytes()
        elif path.endswith("/lora_b"):
            assert not np.array_equal(a[path], b[path])
        else:
            assert a[path].tobytes() == b[path].tobytes(), path
    moments = sorted(tuple(x.shape) for x in jax.tree_util.tree_leaves(after.opt_state) if np.ndim(x) > 0)
    assert moments == sorted(2 * [tuple(b[p].shape) for p in adapters])  # Adam's mu and nu, adapters only


def test_flops_of_a_frozen_subset_drop_the_frozen_weight_gradients():
    """6 FLOPs per parameter and token when everything trains; a frozen kernel costs 4 (forward and
    activation gradient), so freezing all but the head removes 2 x (the other kernels) x tokens."""
    from t5x_like.models.flops import matmul_params

    model, _ = _setup()
    params, lengths = model.param_shapes(), {"decoder_input_tokens": LENGTH}
    sgd = optax.sgd(1.0)
    full = TrainableSubset(sgd, None).flops_per_example(model, params, lengths)
    assert full == model.flops_per_example(params, lengths)
    head = TrainableSubset(sgd, "logits_dense/").flops_per_example(model, params, lengths)
    frozen_kernels = matmul_params(params, model.config) - 32 * VOCAB
    np.testing.assert_allclose(full - head, 2 * frozen_kernels * LENGTH, rtol=1e-12)
