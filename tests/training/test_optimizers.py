"""Schedules, the weight-decay mask, Adafactor's factored state, and optimizer-state logical axes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from t5x_like.models import DecoderOnlyConfig, EncoderOnlyConfig, model_for_config
from t5x_like.training import optimizers
from t5x_like.training.train_state import TrainState, opt_state_logical_axes, train_state_logical_axes

TINY = dict(vocab_size=64, d_model=32, num_heads=4, head_dim=8, mlp_dim=64)
BATCH_SHAPES = {"decoder_input_tokens": (8, 16)}


def _gpt2(**kw):  # biases, LayerNorm (scale + bias), learned positions, tied embeddings
    return model_for_config(DecoderOnlyConfig(num_layers=2, norm_type="layer", use_bias=True,
                                              position_embedding="learned", max_position_embeddings=32,
                                              **TINY, **kw))


def _path(path):
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _leaves(tree, is_leaf=None):
    return {_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}


def test_rsqrt_schedule_constant_then_inverse_sqrt():
    sched = optimizers.rsqrt_schedule(base_learning_rate=1.0, warmup_steps=100)
    for step in (0, 1, 50, 100):
        assert float(sched(step)) == pytest.approx(0.1)
    for step in (400, 10_000):
        assert float(sched(step)) == pytest.approx(1 / np.sqrt(step))
    t5 = optimizers.adafactor().schedule  # T5 defaults: 0.01 for the first 10k steps
    assert float(t5(0)) == pytest.approx(0.01) and float(t5(40_000)) == pytest.approx(0.005)


def test_warmup_cosine_schedule():
    sched = optimizers.adamw(peak_learning_rate=1e-3, warmup_steps=10, decay_steps=110,
                             end_learning_rate=1e-5).schedule
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(5e-4)
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(60)) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2, rel=1e-4)  # cosine midpoint
    assert float(sched(110)) == pytest.approx(1e-5) and float(sched(500)) == pytest.approx(1e-5)
    values = [float(sched(s)) for s in range(10, 111, 5)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_decay_mask_excludes_biases_norms_and_embeddings():
    params = jax.eval_shape(_gpt2().init_variables, jax.random.PRNGKey(0))["params"]
    mask = _leaves(optimizers.decay_mask(params))
    for name, decayed in mask.items():
        expected = name.endswith("kernel")
        assert decayed == expected, name
    assert any("norm/bias" in n for n in mask) and any("norm/scale" in n for n in mask)
    assert mask["decoder/layers_0/mlp/wi/bias"] is False
    assert mask["token_embed/embedding"] is False and mask["position_embed/embedding"] is False
    with_embeddings = _leaves(optimizers.decay_mask(params, decay_embeddings=True))
    assert with_embeddings["token_embed/embedding"] is True and with_embeddings["decoder/final_norm/scale"] is False


def test_adamw_decays_only_masked_in_params():
    """Zero gradients isolate the decoupled weight decay: kernels shrink, the rest stays put."""
    params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}, "ln_norm": {"scale": jnp.ones(4)},
              "embed": {"embedding": jnp.ones((5, 4))}}
    opt = optimizers.adamw(warmup_steps=0, decay_steps=10, peak_learning_rate=0.1, init_learning_rate=0.1,
                           end_learning_rate=0.1, weight_decay=0.5)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    new = _leaves(optax.apply_updates(params, updates))
    np.testing.assert_allclose(new["dense/kernel"], 1 - 0.1 * 0.5)
    for name in ("dense/bias", "ln_norm/scale", "embed/embedding"):
        np.testing.assert_allclose(new[name], 1.0, err_msg=name)


def test_global_norm_clipping():
    opt = optimizers.adamw(max_grad_norm=1.0)
    assert isinstance(opt.tx.init({"w": jnp.zeros(4)})[0], optax.EmptyState)  # clip_by_global_norm comes first
    clip = optimizers._with_clipping(optax.sgd(1.0), 1.0)
    params = {"w": jnp.zeros(4)}
    updates, _ = clip.update({"w": jnp.full(4, 10.0)}, clip.init(params), params)
    assert float(optax.global_norm(updates)) == pytest.approx(1.0)


def test_adafactor_factored_state_shapes():
    """Factors keep the parameter's rank with the reduced axes of size 1 (training/adafactor.py);
    the attention kernel [embed, heads, kv] is factored as embed x heads*kv."""
    model = model_for_config(DecoderOnlyConfig(num_layers=2, **TINY))
    opt = optimizers.adafactor(min_dim_size_to_factor=16)
    state = TrainState.abstract(model, opt, BATCH_SHAPES)
    factored = state.opt_state[0]
    v_row, v_col, v = (_leaves(getattr(factored, k)) for k in ("v_row", "v_col", "v"))
    wi = "decoder/layers_0/mlp/wi/kernel"  # [embed 32, mlp 64]: factored
    assert (v_row[wi].shape, v_col[wi].shape, v[wi].shape) == ((32, 1), (1, 64), ())
    emb = "token_embed/embedding"  # [vocab 64, embed 32]
    assert (v_row[emb].shape, v_col[emb].shape, v[emb].shape) == ((1, 32), (64, 1), ())
    q = "decoder/layers_0/self_attention/query/kernel"  # [embed 32, heads 4, kv 8]: merged heads*kv = 32
    assert (v_row[q].shape, v_col[q].shape, v[q].shape) == ((32, 1, 1), (1, 4, 8), ())
    scale = "decoder/final_norm/scale"  # vectors are never factored
    assert v[scale].shape == (32,)
    default = TrainState.abstract(model, optimizers.adafactor(), BATCH_SHAPES)  # min size 128: nothing factored
    assert _leaves(default.opt_state[0].v)[wi].shape == (32, 64)
    unbound = _leaves(opt.init(state.params)[0].v)  # no logical axes: optax's two-largest-axes rule
    assert unbound[q].shape == (32, 4, 8) and unbound[wi].shape == ()


def _spec_leaves(tree):
    return _leaves(tree, is_leaf=lambda x: isinstance(x, P))


@pytest.mark.parametrize("make_opt", [
    lambda: optimizers.adamw(),
    lambda: optimizers.adafactor(min_dim_size_to_factor=16, max_grad_norm=1.0, momentum=0.9),
], ids=["adamw", "adafactor"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_opt_state_logical_axes_mirror_params(make_opt, scan_layers):
    model = _gpt2(scan_layers=scan_layers)
    opt = make_opt()
    state = TrainState.abstract(model, opt, BATCH_SHAPES)
    axes = train_state_logical_axes(model, state, BATCH_SHAPES)
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    assert jax.tree_util.tree_structure(axes, is_leaf=is_spec) == jax.tree_util.tree_structure(state)
    for spec, leaf in zip(jax.tree_util.tree_leaves(axes, is_leaf=is_spec), jax.tree_util.tree_leaves(state)):
        assert len(spec) in (0, leaf.ndim), (spec, leaf.shape)
        assert all(s is None for s, n in zip(spec, leaf.shape) if n == 1)
    params_axes, param_shapes = _spec_leaves(axes.params), _leaves(state.params)
    state_leaves = _leaves(state.opt_state)
    mirrored = 0
    for name, spec in _spec_leaves(axes.opt_state).items():
        param = next((p for p in params_axes if name.endswith("/" + p)), None)
        if param is None:
            assert spec == P(), name  # counts and other scalars
        elif state_leaves[name].shape == param_shapes[param].shape:
            assert spec == params_axes[param], name  # adam mu/nu, adafactor v and momentum
            mirrored += 1
    assert mirrored >= len(params_axes)
    specs = _spec_leaves(axes.opt_state)
    wi = "decoder/layers/mlp/wi/kernel" if scan_layers else "decoder/layers_0/mlp/wi/kernel"
    lead = ("layers",) if scan_layers else ()
    assert params_axes[wi] == P(*lead, "embed", "mlp")
    if any("v_row" in k for k in specs):  # factored second moments: the reduced axis replicated
        assert [s for k, s in specs.items() if k.endswith("v_row/" + wi)] == [P(*lead, "embed", None)]
        assert [s for k, s in specs.items() if k.endswith("v_col/" + wi)] == [P(*lead, None, "mlp")]


def test_factored_specs_of_square_kernels_and_without_shapes():
    """Size-1 reduced axes make a square kernel's factors unambiguous; optax's rank-reduced factors
    of a square kernel (which axis was dropped?) are replicated."""
    model = model_for_config(EncoderOnlyConfig(num_layers=1, **TINY))  # mlm_transform kernel is square 32x32
    opt = optimizers.adafactor(min_dim_size_to_factor=16)
    state = TrainState.abstract(model, opt, {"encoder_input_tokens": (8, 16)})
    params_axes = model.logical_axes()["params"]
    with_shapes = _spec_leaves(opt_state_logical_axes(state.opt_state, params_axes, state.params))
    without = _spec_leaves(opt_state_logical_axes(state.opt_state, params_axes))
    mlm = _spec_leaves(params_axes)["mlm_transform/kernel"]
    assert [s for k, s in with_shapes.items() if k.endswith("v_row/mlm_transform/kernel")] == [P(mlm[0], None)]
    assert [s for k, s in with_shapes.items() if k.endswith("v_row/token_embed/embedding")] == [P(None, "embed")]
    assert [s for k, s in without.items() if k.endswith("v_row/token_embed/embedding")] == [P(None, "embed")]
    q = "encoder/layers_0/self_attention/query/kernel"
    assert [s for k, s in without.items() if k.endswith("/v_col/" + q)] == [P(None, "heads", "kv")]
    optax_state = optax.adafactor(0.1, min_dim_size_to_factor=16).init(state.params)
    reduced = _spec_leaves(opt_state_logical_axes(optax_state, params_axes, state.params))
    assert [s for k, s in reduced.items() if k.endswith("v_row/mlm_transform/kernel")] == [P()]
