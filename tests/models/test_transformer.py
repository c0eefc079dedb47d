"""TransformerLayer = the documented composition of its sublayers; TransformerStack's structure."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.layers import MultiHeadAttention, Mlp, Norm, RelativePositionBias
from t5x_like.models.transformer import TransformerLayer, TransformerStack
from t5x_like.interop.hf import stack_layers
from t5x_like.models import DecoderOnlyConfig

CFG = DecoderOnlyConfig(vocab_size=64, d_model=16, num_heads=4, num_kv_heads=2, head_dim=4, mlp_dim=24,
                        num_layers=2, position_embedding="rotary", mlp_activations=("silu", "linear"))


def _sublayers(cfg, rotary):
    attn = MultiHeadAttention(cfg.num_heads, cfg.kv_heads, cfg.head_dim, use_bias=cfg.use_bias,
                              scale_scores=cfg.scale_attention_scores,
                              rotary_theta=cfg.rotary_theta if rotary else None)
    cross = MultiHeadAttention(cfg.num_heads, cfg.kv_heads, cfg.head_dim, use_bias=cfg.use_bias,
                               scale_scores=cfg.scale_attention_scores)
    norm = Norm(cfg.norm_type, cfg.norm_epsilon)
    mlp = Mlp(cfg.mlp_dim, cfg.mlp_activations, use_bias=cfg.use_bias)
    return attn, cross, norm, mlp


@pytest.mark.parametrize("norm_position,cross", [("pre", False), ("pre", True), ("post", True)])
def test_layer_is_residual_composition(norm_position, cross, random_params):
    """pre: x + f(norm(x)) per sublayer (T5/GPT/LLaMA); post: norm(x + f(x)) (BERT)."""
    cfg = CFG.replace(norm_position=norm_position, norm_type="layer" if norm_position == "post" else "rms",
                      use_bias=norm_position == "post")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 16)).astype(np.float32)
    enc = rng.normal(size=(2, 5, 16)).astype(np.float32)
    mask = np.tril(np.ones((6, 6), np.float32))[None, None].repeat(2, 0)
    cross_mask = np.ones((2, 1, 6, 5), np.float32)
    cross_mask[1, 0, :, 3:] = 0.0
    pos = np.array([[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2]])
    layer = TransformerLayer(cfg, has_cross_attention=cross)
    args = (x, mask, None, pos) + ((enc, cross_mask) if cross else ())
    params = random_params(layer, *args)
    expected = {"self_attention", "self_attention_norm", "mlp", "mlp_norm"}
    if cross:
        expected |= {"cross_attention", "cross_attention_norm"}
    assert set(params) == expected
    got = np.asarray(layer.apply({"params": params}, *args))

    attn, cross_attn, norm, mlp = _sublayers(cfg, rotary=True)
    ap = lambda mod, name, *a: mod.apply({"params": params[name]}, *a)  # noqa: E731
    if norm_position == "pre":
        h = ap(norm, "self_attention_norm", x)
        y = x + ap(attn, "self_attention", h, h, mask, None, pos, pos)
        if cross:
            y = y + ap(cross_attn, "cross_attention", ap(norm, "cross_attention_norm", y), enc, cross_mask)
        y = y + ap(mlp, "mlp", ap(norm, "mlp_norm", y))
    else:
        y = ap(norm, "self_attention_norm", x + ap(attn, "self_attention", x, x, mask, None, pos, pos))
        if cross:
            y = ap(norm, "cross_attention_norm", y + ap(cross_attn, "cross_attention", y, enc, cross_mask))
        y = ap(norm, "mlp_norm", y + ap(mlp, "mlp", y))
    np.testing.assert_allclose(got, np.asarray(y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_stack_structure(scan):
    """Scanned params gain a leading `layers` axis; the T5 bias table is one per stack; final norm iff pre."""
    x = np.ones((1, 4, 16), np.float32)
    mask = np.ones((1, 1, 4, 4), np.float32)
    for pe, norm_position in (("relative", "pre"), ("rotary", "post")):
        cfg = CFG.replace(position_embedding=pe, norm_position=norm_position, scan_layers=scan,
                          relative_num_buckets=8, relative_max_distance=16)
        stack = TransformerStack(cfg, 3, causal=True)
        shapes = jax.eval_shape(lambda: stack.init(jax.random.key(0), x, mask))["params"]
        layer_names = ["layers"] if scan else ["layers_0", "layers_1", "layers_2"]
        expected = set(layer_names) | ({"relpos_bias"} if pe == "relative" else set()) | (
            {"final_norm"} if norm_position == "pre" else set())
        assert set(shapes) == expected
        if scan:
            kernel = shapes["layers"]["self_attention"]["query"]["kernel"]
            assert kernel.value.shape == (3, 16, 4, 4)
        if pe == "relative":
            assert shapes["relpos_bias"]["rel_embedding"].value.shape == (8, 4)


def test_stack_outputs_ignore_masked_keys(random_params):
    """Through several layers, a key hidden by the mask from every query still has no influence."""
    cfg = CFG.replace(position_embedding="relative", relative_num_buckets=8, relative_max_distance=16)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 5, 16)).astype(np.float32)
    mask = np.ones((1, 1, 5, 5), np.float32)
    mask[..., 2] = 0.0
    stack = TransformerStack(cfg, 2, causal=False)
    params = {"params": random_params(stack, x, mask)}
    apply = jax.jit(stack.apply)
    out = np.asarray(apply(params, x, mask))
    x2 = x.copy()
    x2[0, 2] = rng.normal(size=16)
    out2 = np.asarray(apply(params, x2, mask))
    keep = [0, 1, 3, 4]
    np.testing.assert_allclose(out2[0, keep], out[0, keep], atol=1e-5)
    assert not np.allclose(out2[0, 2], out[0, 2], atol=1e-3)
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("scan", [False, True])
def test_stack_is_bias_then_layers_then_final_norm(causal, scan, random_params):
    """One T5 bias (causal buckets in a decoder, bidirectional in an encoder) feeds every layer in order."""
    cfg = CFG.replace(position_embedding="relative", relative_num_buckets=8, relative_max_distance=16)
    rng = np.random.default_rng(1)
    length = 7
    x = rng.normal(size=(2, length, 16)).astype(np.float32)
    mask = np.ones((2, 1, length, length), np.float32)
    if causal:
        mask = np.tril(mask)
    stack = TransformerStack(cfg, 2, causal=causal)
    params = random_params(stack, x, mask, seed=5)
    bias = RelativePositionBias(8, 16, cfg.num_heads, bidirectional=not causal).apply(
        {"params": params["relpos_bias"]}, length, length)
    layer = TransformerLayer(cfg)
    y = x
    for i in range(2):
        y = layer.apply({"params": params[f"layers_{i}"]}, y, mask, bias)
    y = Norm(cfg.norm_type, cfg.norm_epsilon).apply({"params": params["final_norm"]}, y)
    if scan:
        stack = TransformerStack(cfg.replace(scan_layers=True), 2, causal=causal)
        params = stack_layers(params)
    got = jax.jit(stack.apply)({"params": params}, x, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_scanned_layers_draw_different_dropout_masks():
    """nn.scan must split the dropout rng: each layer gets its own masks, not copies of layer 0's."""
    cfg = CFG.replace(dropout_rate=0.5, scan_layers=True, position_embedding="none")
    stack = TransformerStack(cfg, 3, causal=True)
    x = np.random.default_rng(0).normal(size=(1, 4, 16)).astype(np.float32)
    mask = np.ones((1, 1, 4, 4), np.float32)
    params = jax.eval_shape(lambda: stack.init(jax.random.key(0), x, mask))
    params = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.1, s.dtype), params)
    records = []

    def record_dropout(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dropout):
            path = "/".join(context.module.path)
            jax.debug.callback(lambda m, path=path: records.append((path, np.asarray(m))), out == 0)
        return out

    def run(p, x, r):
        with nn.intercept_methods(record_dropout):
            return stack.apply(p, x, mask, deterministic=False, rngs={"dropout": r})

    jax.block_until_ready(jax.jit(run)(params, x, jax.random.key(1)))
    jax.effects_barrier()
    by_site = {}
    for path, m in records:
        by_site.setdefault(path, []).append(m)
    per_layer = {p: ms for p, ms in by_site.items() if len(ms) == 3}
    assert per_layer, f"no per-layer dropout recorded: {sorted(by_site)}"
    for path, ms in per_layer.items():
        assert all(m.any() for m in ms), path
        assert not (np.array_equal(ms[0], ms[1]) or np.array_equal(ms[1], ms[2])), f"{path}: same mask in every layer"
