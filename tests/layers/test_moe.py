"""MoE layer against a float64 numpy reference of the same routing, capacity and router losses;
the dropless implementation (both grouped-matmul methods) against the same reference and against
the capacity path with unlimited capacity, in outputs and gradients."""

import jax
import numpy as np
import pytest
import flax.linen as nn

from t5x_like.layers.moe import MoeMlp, collect_moe_aux, expert_capacity

D, M, E = 16, 24, 4


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _run(module, x, seed=0, randomize_biases=False):
    """(output, float64 params, router aux) of one apply; biases (zero at init) optionally randomised."""
    params = nn.unbox(module.init(jax.random.key(seed), x))["params"]
    if randomize_biases:
        rng = np.random.default_rng(seed + 1)
        params = {k: (0.3 * rng.standard_normal(v.shape).astype(np.float32) if k.endswith("_bias") else v)
                  for k, v in params.items()}
    y, state = module.apply({"params": params}, x, mutable=["intermediates"])
    params64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    return np.asarray(y), params64, collect_moe_aux(state["intermediates"])


def _reference(params, x, top_k, capacity, renormalize, group_size=None, use_bias=False):
    """Token-by-token: route, apply capacity in rank-major then token order, mix the experts.

    Returns (output, number of dropped assignments, router losses).
    """
    x = np.asarray(x, np.float64)
    b, l, d = x.shape
    groups = x.reshape(-1, group_size or l, d)
    out = np.zeros_like(groups)
    dropped, aux, z = 0, [], []
    for g, xg in enumerate(groups):
        logits = xg @ params["router"]["kernel"]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]          # [S, k]
        weights = np.take_along_axis(probs, order, -1)
        if renormalize and top_k > 1:
            weights = weights / weights.sum(-1, keepdims=True)
        load = np.zeros(E, int)
        for r in range(top_k):
            for t in range(len(xg)):
                e = order[t, r]
                if load[e] >= capacity:
                    dropped += 1
                    continue
                load[e] += 1
                h = _silu(xg[t] @ params["wi_0"][e] + (params["wi_0_bias"][e] if use_bias else 0))
                h = h * (xg[t] @ params["wi_1"][e] + (params["wi_1_bias"][e] if use_bias else 0))
                out[g, t] += weights[t, r] * (h @ params["wo"][e] + (params["wo_bias"][e] if use_bias else 0))
        fraction = np.bincount(order.ravel(), minlength=E) / order.size
        aux.append(E * np.sum(fraction * probs.mean(0)))
        lse = np.log(np.exp(logits).sum(-1))
        z.append(np.mean(lse ** 2))
    return out.reshape(b, l, d), dropped, np.mean(aux), np.mean(z)


def _module(**kw):
    kw = {"num_experts": E, "mlp_dim": M, "activations": ("silu", "linear"), **kw}
    return MoeMlp(**kw)


IMPLS = [dict(impl="capacity"), dict(impl="dropless", grouped_matmul="blocked"),
         dict(impl="dropless", grouped_matmul="ragged")]


@pytest.mark.parametrize("impl", IMPLS, ids=lambda d: "-".join(d.values()))
@pytest.mark.parametrize("top_k, renormalize, group_size, use_bias", [
    (1, True, None, False), (2, True, None, True), (2, False, None, False), (2, True, 6, False)])
def test_no_dropping_equals_dense_reference(top_k, renormalize, group_size, use_bias, impl):
    x = np.random.default_rng(0).standard_normal((3, 10, D)).astype(np.float32)
    module = _module(top_k=top_k, capacity_factor=None, renormalize_top_k=renormalize, group_size=group_size,
                     use_bias=use_bias, **impl)
    y, params, aux = _run(module, x, randomize_biases=use_bias)
    ref, dropped, ref_aux, ref_z = _reference(params, x, top_k, capacity=10 ** 9, renormalize=renormalize,
                                              group_size=group_size, use_bias=use_bias)
    assert dropped == 0 and float(aux["moe_dropped_fraction"]) == 0.0
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(aux["moe_aux_loss"]), ref_aux, rtol=1e-5)
    np.testing.assert_allclose(float(aux["moe_z_loss"]), ref_z, rtol=1e-5)


@pytest.mark.parametrize("top_k, capacity_factor", [(1, 0.5), (2, 0.5), (2, 1.0)])
def test_small_capacity_drops_and_reports_the_direct_count(top_k, capacity_factor):
    x = np.random.default_rng(2).standard_normal((4, 12, D)).astype(np.float32)
    module = _module(top_k=top_k, capacity_factor=capacity_factor, impl="capacity")
    y, params, aux = _run(module, x, seed=3)
    capacity = expert_capacity(12, E, top_k, capacity_factor)
    ref, dropped, _, _ = _reference(params, x, top_k, capacity, renormalize=True)
    assert dropped > 0, "the test should exercise dropping"
    assert float(aux["moe_dropped_fraction"]) == pytest.approx(dropped / (4 * 12 * top_k), abs=1e-7)
    # Dropped assignments contribute nothing, the kept ones exactly what they would without dropping.
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    usage_max, usage_min = float(aux["moe_expert_usage_max"]), float(aux["moe_expert_usage_min"])
    assert 1.0 / E - 1e-6 <= usage_max <= 1.0 and 0.0 <= usage_min <= 1.0 / E + 1e-6


def test_capacity_formula():
    assert expert_capacity(12, 4, 2, 1.0) == 6
    assert expert_capacity(12, 4, 1, 1.25) == 4        # ceil(3.75)
    assert expert_capacity(12, 4, 2, None) == 12
    assert expert_capacity(12, 4, 2, 100.0) == 12      # never more slots than tokens
    assert expert_capacity(3, 64, 1, 0.1) == 1


def test_group_size_must_divide_tokens():
    x = np.zeros((2, 5, D), np.float32)
    with pytest.raises(ValueError, match="moe_group_size=4"):
        _module(group_size=4, impl="capacity").init(jax.random.key(0), x)


# Dropless: every gradient is checked nonzero and equal to the capacity path's below.
@pytest.mark.parametrize("impl", ["capacity", pytest.param("dropless", marks=pytest.mark.slow)])
def test_gradients_reach_router_and_experts(impl):
    x = np.random.default_rng(0).standard_normal((2, 8, D)).astype(np.float32)
    module = _module(top_k=1, impl=impl)
    variables = nn.unbox(module.init(jax.random.key(0), x))

    def loss(params):
        y, state = module.apply({"params": params}, x, mutable=["intermediates"])
        return np.float32(0.5) * (y ** 2).sum() + collect_moe_aux(state["intermediates"])["moe_aux_loss"]

    grads = jax.jit(jax.grad(loss))(variables["params"])
    for name in ("router", "wi_0", "wi_1", "wo"):
        assert float(sum(np.abs(np.asarray(g)).sum() for g in jax.tree_util.tree_leaves(grads[name]))) > 0, name


@pytest.mark.parametrize("impl", [pytest.param("capacity", marks=pytest.mark.slow), "dropless"])
def test_bfloat16_matches_float32_with_several_groups(impl):
    """bf16 activations over several routing groups train (every dot has a CPU kernel for its
    dtypes) and stay within bf16 rounding of the float32 layer."""
    x = np.random.default_rng(0).standard_normal((2, 64, 32)).astype(np.float32)   # 2 groups of 64
    f32, bf16 = _module(top_k=2, impl=impl), _module(top_k=2, dtype=jax.numpy.bfloat16, impl=impl)
    params = nn.unbox(f32.init(jax.random.key(0), x))["params"]

    def loss(module, p, inputs):   # inputs as an argument: a constant would fold the dispatch away
        return (module.apply({"params": p}, inputs.astype(module.dtype)).astype(np.float32) ** 2).sum()

    (l32, g32), (l16, g16) = (jax.jit(jax.value_and_grad(lambda p, i, m=m: loss(m, p, i)))(params, x)
                              for m in (f32, bf16))
    np.testing.assert_allclose(float(l16), float(l32), rtol=3e-2)
    np.testing.assert_allclose(np.asarray(g16["wo"]), np.asarray(g32["wo"]), rtol=0.1, atol=0.1 * np.abs(g32["wo"]).max())


@pytest.mark.parametrize("top_k, renormalize, use_bias, method, activations", [
    pytest.param(1, True, False, "blocked", ("relu",), marks=pytest.mark.slow),
    (2, True, True, "blocked", ("silu", "linear")),
    pytest.param(2, False, False, "blocked", ("gelu", "linear"), marks=pytest.mark.slow),
    (2, True, True, "ragged", ("silu", "linear"))])
def test_dropless_gradients_equal_capacity_path_with_unlimited_capacity(top_k, renormalize, use_bias, method,
                                                                         activations):
    """Same routing, same router losses: every parameter's and the input's gradient agree. 160
    tokens in blocks of 128 rows: several blocks per expert, some of them partly padding."""
    x = np.random.default_rng(4).standard_normal((4, 40, D)).astype(np.float32)
    capacity = _module(top_k=top_k, renormalize_top_k=renormalize, use_bias=use_bias, activations=activations,
                       impl="capacity", capacity_factor=None)
    dropless = capacity.clone(impl="dropless", grouped_matmul=method)
    params = nn.unbox(capacity.init(jax.random.key(1), x))["params"]
    rng = np.random.default_rng(5)
    params = jax.tree_util.tree_map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), params)

    def grads(module):
        def loss(p, inputs):
            y, state = module.apply({"params": p}, inputs, mutable=["intermediates"])
            aux = collect_moe_aux(state["intermediates"])
            return 0.5 * (y ** 2).sum() + aux["moe_aux_loss"] + aux["moe_z_loss"]
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    expected, got = grads(capacity), grads(dropless)
    for (path, g), other in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree_util.tree_leaves(got)):
        g = np.asarray(g)
        assert np.abs(g).max() > 0, path
        np.testing.assert_allclose(np.asarray(other), g, rtol=1e-5, atol=1e-5 * np.abs(g).max(), err_msg=str(path))


def test_dropless_reports_no_drops_and_exact_expert_usage():
    x = np.random.default_rng(6).standard_normal((2, 24, D)).astype(np.float32)
    module = _module(top_k=2, impl="dropless")
    _, params, aux = _run(module, x)
    logits = np.asarray(x, np.float64).reshape(-1, D) @ params["router"]["kernel"]
    counts = np.bincount(np.argsort(-logits, axis=-1)[:, :2].ravel(), minlength=E) / (48 * 2)
    assert float(aux["moe_dropped_fraction"]) == 0.0
    assert float(aux["moe_expert_usage_max"]) == pytest.approx(counts.max(), abs=1e-7)
    assert float(aux["moe_expert_usage_min"]) == pytest.approx(counts.min(), abs=1e-7)


@pytest.mark.parametrize("method", ["blocked", "ragged"])
def test_dropless_expert_dropout_trains_and_is_off_when_deterministic(method):
    x = np.random.default_rng(7).standard_normal((2, 16, D)).astype(np.float32)
    train = _module(top_k=2, impl="dropless", grouped_matmul=method, dropout_rate=0.5, deterministic=False)
    params = nn.unbox(train.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x))["params"]
    rngs = {"dropout": jax.random.key(2)}
    loss = jax.jit(jax.value_and_grad(lambda p: (train.apply({"params": p}, x, rngs=rngs) ** 2).sum()))
    (value, grads), (again, _) = loss(params), loss(params)
    assert float(value) == float(again) and np.isfinite(float(value))   # the mask comes from the rng
    assert float(np.abs(np.asarray(grads["wi_0"])).sum()) > 0
    eval_y = train.clone(deterministic=True).apply({"params": params}, x)
    ref_y = train.clone(deterministic=True, dropout_rate=0.0).apply({"params": params}, x)
    np.testing.assert_array_equal(np.asarray(eval_y), np.asarray(ref_y))
    assert float(value) != pytest.approx(float((np.asarray(ref_y) ** 2).sum()), rel=1e-3)
