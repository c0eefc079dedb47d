"""Adafactor factored over merged logical axes (training/adafactor.py) against a float64 numpy
Adafactor (Shazeer & Stern 2018, Algorithm 4 with T5's settings) on the merged 2-D matrix of each
batch slice, plus the state's shapes, shardings and size on T5.1.1-XXL's shapes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from t5x_like.models import DecoderOnlyConfig, EncoderDecoderConfig, model_for_config
from t5x_like.training import adafactor, optimizers
from t5x_like.training.train_state import TrainState, train_state_logical_axes

EPS1, EPS2, CLIP, LR = 1e-30, 1e-3, 1.0, 0.01


def _numpy_adafactor_2d(x, grads):
    """Textbook Adafactor on one matrix x [n, m], float64: returns x after len(grads) steps."""
    x = x.astype(np.float64)
    r, c = np.zeros(x.shape[0]), np.zeros(x.shape[1])
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        beta2 = 1 - t ** -0.8
        g2 = g * g + EPS1
        r = beta2 * r + (1 - beta2) * g2.mean(axis=1)
        c = beta2 * c + (1 - beta2) * g2.mean(axis=0)
        v_hat = np.outer(r, c) / r.mean()
        u = g / np.sqrt(v_hat)
        u = u / max(1.0, np.sqrt(np.mean(u * u)) / CLIP)
        x = x - LR * max(EPS2, np.sqrt(np.mean(x * x))) * u
    return x


def _numpy_reference(x, grads, batch_axes, row_axes):
    """Move batch axes first, rows next; each batch slice is the matrix [prod(rows), prod(rest)]."""
    col_axes = [d for d in range(x.ndim) if d not in batch_axes + row_axes]
    order = list(batch_axes) + list(row_axes) + col_axes
    shape = [x.shape[d] for d in order]
    nb, nr = math.prod(shape[:len(batch_axes)]), math.prod(shape[len(batch_axes):len(batch_axes) + len(row_axes)])
    flat = lambda a: np.transpose(a, order).reshape(nb, nr, -1)  # noqa: E731
    out = np.stack([_numpy_adafactor_2d(flat(x)[b], [flat(g)[b] for g in grads]) for b in range(nb)])
    return np.transpose(out.reshape(shape), np.argsort(order))


def _run(opt, params, axes, grads):
    state = opt.init(params, axes)
    for g in grads:
        updates, state = jax.jit(opt.update)(g, state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    return params, state


@pytest.mark.parametrize("names,shape,batch_axes,row_axes", [
    (("embed", "heads", "kv"), (48, 4, 8), [], [0]),                   # attention q/k/v: embed x heads*kv
    (("heads", "kv", "embed"), (4, 8, 48), [], [2]),                   # attention out
    (("layers", "embed", "heads", "kv"), (3, 40, 2, 16), [0], [1]),    # scanned: each layer its own
    (("expert", "embed", "mlp"), (3, 24, 40), [0], [1]),               # MoE experts: per expert
    (("layers", "expert", "mlp", "embed"), (2, 2, 40, 24), [0, 1], [3]),
], ids=["qkv", "out", "scanned", "expert", "scanned_expert_wo"])
def test_factored_update_equals_float64_numpy(names, shape, batch_axes, row_axes):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    grads = [(rng.normal(size=shape) * rng.uniform(0.1, 3.0, size=shape)).astype(np.float32) for _ in range(4)]
    opt = optimizers.adafactor(schedule=lambda step: LR, min_dim_size_to_factor=16)
    params, state = _run(opt, {"w": jnp.asarray(x)}, {"w": P(*names)}, [{"w": jnp.asarray(g)} for g in grads])
    assert state[0].v["w"].shape == ()  # factored: no full second moment
    expected = _numpy_reference(x, grads, batch_axes, row_axes)
    np.testing.assert_allclose(np.asarray(params["w"]), expected, rtol=2e-5, atol=2e-6)
    # Not trivially equal: the unfactored (Adam-like) second moment gives another result.
    full = optimizers.adafactor(schedule=lambda step: LR, factored=False)
    other, _ = _run(full, {"w": jnp.asarray(x)}, {"w": P(*names)}, [{"w": jnp.asarray(g)} for g in grads])
    assert np.abs(np.asarray(other["w"]) - expected).max() > 1e-4


def test_without_axes_matches_optax_adafactor():
    """No logical names: optax's own rule and numbers (a 2-D kernel and an unfactored vector)."""
    rng = np.random.default_rng(1)
    normal = lambda shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    params = {"k": normal((40, 24)), "b": normal(24)}
    grads = [jax.tree_util.tree_map(lambda p: normal(p.shape), params) for _ in range(3)]
    ours = optimizers.adafactor(schedule=lambda step: LR, min_dim_size_to_factor=16)
    ref = optax.adafactor(learning_rate=LR, min_dim_size_to_factor=16)
    a, b = params, params
    sa, sb = ours.init(params), ref.init(params)
    for g in grads:
        ua, sa = ours.update(g, sa, a)
        ub, sb = ref.update(g, sb, b)
        a, b = optax.apply_updates(a, ua), optax.apply_updates(b, ub)
    for k in params:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-6, atol=1e-7)


def test_plan_rules():
    rules, plan = adafactor.FACTOR_RULES, adafactor.plan_from_axes
    assert plan(("embed", "heads", "kv"), (4096, 64, 64), rules, True, 128) == ((0,), (1, 2), ())
    assert plan(("layers", "embed", "mlp"), (24, 4096, 10240), rules, True, 128) == ((1,), (2,), (0,))
    assert not plan(("embed", "mlp"), (32, 64), rules, True, 128).factored  # merged sizes below the minimum
    assert not plan(("relpos_buckets", "heads"), (32, 64), rules, True, 1).factored  # a 'none' axis
    assert plan(("embed", "heads", "kv"), (4096, 64, 64), rules, False, 128) == ((), (), ())
    assert plan(("mystery", "embed"), (300, 200), rules, True, 128) == ((1,), (0,), ())  # unknown: optax's rule


def test_state_shapes_and_shardings_follow_the_param_axes():
    model = model_for_config(DecoderOnlyConfig(num_layers=2, scan_layers=True, num_experts=4, vocab_size=64,
                                               d_model=32, num_heads=4, head_dim=8, mlp_dim=64))
    opt = optimizers.adafactor(min_dim_size_to_factor=16)
    shapes = {"decoder_input_tokens": (8, 16)}
    state = TrainState.abstract(model, opt, shapes)
    axes = train_state_logical_axes(model, state, shapes)
    q, wi = ("decoder", "layers", "self_attention", "query", "kernel"), ("decoder", "layers", "mlp", "wi")
    get = lambda tree, path: tree[path[0]][path[1]][path[2]][path[3]][path[4]] if len(path) == 5 else \
        tree[path[0]][path[1]][path[2]][path[3]]  # noqa: E731
    f, fa = state.opt_state[0], axes.opt_state[0]
    assert get(state.params, q).shape == (2, 32, 4, 8)
    assert (get(f.v_row, q).shape, get(f.v_col, q).shape, get(f.v, q).shape) == ((2, 32, 1, 1), (2, 1, 4, 8), ())
    assert get(fa.v_row, q) == P("layers", "embed", None, None) and get(fa.v_col, q) == P("layers", None, "heads", "kv")
    assert get(state.params, wi).shape == (2, 4, 32, 64)  # [layers, expert, embed, mlp]
    assert (get(f.v_row, wi).shape, get(f.v_col, wi).shape) == ((2, 4, 32, 1), (2, 4, 1, 64))
    assert get(fa.v_col, wi) == P("layers", "expert", None, "mlp")


def _bytes(tree):
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def test_t5_xxl_optimizer_state_is_small():
    """T5.1.1-XXL's layer shapes (one layer per stack, nothing allocated): state <= 5% of params,
    where optax's largest-two-axes rule keeps every attention kernel's full second moment."""
    config = EncoderDecoderConfig(vocab_size=32128, d_model=4096, num_heads=64, head_dim=64, mlp_dim=10240,
                                  num_encoder_layers=1, num_decoder_layers=1, mlp_activations=("gelu", "linear"),
                                  scan_layers=True)
    model = model_for_config(config)
    shapes = {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8), "decoder_target_tokens": (1, 8)}
    state = TrainState.abstract(model, optimizers.adafactor(), shapes)
    ratio = _bytes(state.opt_state) / _bytes(state.params)
    assert ratio <= 0.05, ratio
    unbound = jax.eval_shape(optimizers.adafactor().init, state.params)  # no axes: optax's rule
    assert _bytes(unbound) / _bytes(state.params) > 0.3


def test_factor_rules_extend_the_defaults_and_bad_roles_are_a_user_error():
    params = {"w": jnp.ones((4, 40, 48)), "u": jnp.ones((40, 48))}
    axes = {"w": P("my_stack", "embed", "mlp"), "u": None}  # a new name; a param without names
    state = optimizers.adafactor(min_dim_size_to_factor=16, factor_rules={"my_stack": "batch"}).init(params, axes)[0]
    assert state.v_row["w"].shape == (4, 40, 1) and state.v_col["w"].shape == (4, 1, 48)
    assert state.v_row["u"].shape == (40, 1)  # no names: optax's rule (the two largest axes)
    with pytest.raises(optimizers.OptimizerConfigError, match="my_stack.*'row', 'column', 'batch', 'none'"):
        optimizers.adafactor(factor_rules={"my_stack": "stack"})


def test_plan_survives_the_state_round_trip_with_unit_axes():
    """The plan is read back from the state's shapes, size-1 axes included (min size 1)."""
    for names, shape in ((("embed", "heads", "kv"), (6, 1, 5)), (("layers", "embed", "mlp"), (3, 1, 7)),
                         (("layers", "embed"), (2, 9)), (("embed", "mlp"), (4, 5))):
        plan = adafactor.plan_from_axes(names, shape, adafactor.FACTOR_RULES, True, 1)
        v_row, v_col, v = adafactor.init_leaf(jnp.ones(shape), plan)
        back = adafactor.plan_from_state(len(shape), v_row, v_col, v)
        assert back.factored == plan.factored and set(back.batch) == {d for d in plan.batch if shape[d] > 1}
        g = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
        update, *new = adafactor.update_leaf(g, jnp.ones(shape), v_row, v_col, v, 0.5, epsilon=1e-30,
                                             clipping_threshold=None, multiply_by_parameter_scale=False, min_scale=0)
        assert [x.shape for x in new] == [x.shape for x in (v_row, v_col, v)]
        assert np.all(np.isfinite(np.asarray(update)))


def _factor_state_on(mesh):
    """Adafactor's state of a small scanned LM on `mesh`: abstract state and its shardings."""
    from t5x_like.training.train_state import sharded_abstract_state
    model = model_for_config(DecoderOnlyConfig(num_layers=2, scan_layers=True, vocab_size=64, d_model=32,
                                               num_heads=4, head_dim=8, mlp_dim=64))
    opt = optimizers.adafactor(schedule=lambda step: LR, min_dim_size_to_factor=16)
    return model, opt, *sharded_abstract_state(model, opt, {"decoder_input_tokens": (8, 16)}, mesh)


def test_factored_state_is_split_over_fsdp_not_replicated():
    """fsdp=8: the factors whose reduced axis was embed (the fsdp one) keep mlp / heads x kv, tensor
    axes; they split over fsdp too instead of sitting whole on every device."""
    from t5x_like import partitioning
    mesh = partitioning.create_mesh(data=1, fsdp=8)
    _, _, state, _ = _factor_state_on(mesh)
    f = state.opt_state[0]
    wi = f.v_col["decoder"]["layers"]["mlp"]["wi"]["kernel"]              # [layers, 1, mlp]
    q = f.v_col["decoder"]["layers"]["self_attention"]["query"]["kernel"]   # [layers, 1, heads, kv]
    assert wi.shape == (2, 1, 64) and wi.sharding.shard_shape(wi.shape) == (2, 1, 8)
    assert q.shape == (2, 1, 4, 8) and math.prod(q.sharding.shard_shape(q.shape)) == math.prod(q.shape) // 8
    for leaf in jax.tree_util.tree_leaves(state.opt_state):                 # nothing split twice over fsdp
        assert str(leaf.sharding.spec).count("fsdp") <= 1
    v_row = f.v_row["decoder"]["layers"]["mlp"]["wi"]["kernel"]            # [layers, embed, 1]: as before
    assert v_row.sharding.spec == P(None, "fsdp", None)


def test_spread_state_sharding_keeps_the_param_axes_and_skips_what_does_not_divide():
    from t5x_like import partitioning
    mesh = partitioning.create_mesh(data=1, fsdp=4, tensor=2)
    s = lambda *spec: jax.sharding.NamedSharding(mesh, P(*spec))  # noqa: E731
    spread = partitioning.spread_state_sharding
    assert spread(s(None, None, "tensor"), (3, 1, 16)).spec == P(None, None, ("tensor", "fsdp"))
    assert spread(s(None, None, "tensor"), (3, 1, 4)).spec == P(None, None, "tensor")   # 4/2 shards: 4 no
    assert spread(s("fsdp", None), (8, 8)).spec == P("fsdp", None)                      # fsdp already used
    assert spread(s(), ()).spec == P()                                                  # scalars


def test_update_on_an_fsdp_mesh_equals_one_device():
    """The same steps with the spread state on fsdp=8 and unsharded on one device."""
    from t5x_like import partitioning
    mesh = partitioning.create_mesh(data=1, fsdp=8)
    model, opt, abstract, shardings = _factor_state_on(mesh)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), abstract.params)
    grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), abstract.params)
             for _ in range(3)]
    axes = train_state_logical_axes(model, abstract, {"decoder_input_tokens": (8, 16)}).params
    one, _ = _run(opt, params, axes, grads)
    step = jax.jit(opt.update, in_shardings=(shardings.params, shardings.opt_state, shardings.params),
                   out_shardings=(shardings.params, shardings.opt_state))
    p = jax.device_put(params, shardings.params)
    state = jax.device_put(opt.init(params, axes), shardings.opt_state)
    for g in grads:
        updates, state = step(jax.device_put(g, shardings.params), state, p)
        p = jax.tree_util.tree_map(lambda a, u: a + u, p, updates)
    wi = state[0].v_col["decoder"]["layers"]["mlp"]["wi"]["kernel"]
    assert not wi.sharding.is_fully_replicated
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
