"""int8 activations x int8 / int4 codes (layers/quantized_matmul.py): the integer path against a
float64 numpy recomputation of the same math, its error against the float matmul, DenseGeneral and
a decoder-only model choosing it through `quantized_matmul`, straight-through gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.layers import DenseGeneral
from t5x_like.layers.quantization import QuantizedArray, dequantize, quantize, quantize_params
from t5x_like.layers.quantized_matmul import int8_matmul, quantize_rows
from t5x_like.models.base import ModelCapabilityError
from t5x_like.models.config import DecoderOnlyConfig
from t5x_like.models.decoder_only import DecoderOnlyModel

is_q = lambda x: isinstance(x, QuantizedArray)  # noqa: E731


def _codes_np(q):
    """The integer weights q stores, [in_padded..., out...] int64, unpacked in numpy (int4: high
    nibble first, minus 8)."""
    c = np.asarray(q.codes).astype(np.int64)
    if q.scheme == "int8":
        return c
    axis = q.in_ndim - 1
    both = np.stack([c >> 4, c & 0xF], axis=axis + 1)
    return both.reshape(c.shape[:axis] + (2 * c.shape[axis],) + c.shape[axis + 1:]) - 8


def _reference(x, q):
    """float64: x rows quantized to int8 (absmax / 127 per row; the division in float32 as the layer
    does it), int64 dots per scale block, block scales, row scale."""
    t = x.shape[0]
    x32 = x.reshape(t, *q.shape[:q.in_ndim]).astype(np.float32)
    s_x = np.abs(x32.reshape(t, -1)).max(axis=1).astype(np.float32) / np.float32(127)
    xq = np.clip(np.round(x32 / s_x.reshape((t,) + (1,) * q.in_ndim)), -127, 127).astype(np.int64)
    codes, scale = _codes_np(q), np.asarray(q.scale, np.float64)
    n_in = q.in_ndim
    pad = codes.shape[n_in - 1] - xq.shape[-1]
    xq = np.pad(xq, [(0, 0)] * n_in + [(0, pad)])
    if q.scheme == "int8":  # one scale per output channel
        acc = np.tensordot(xq, codes, axes=n_in)
        return acc * scale.reshape(q.shape[n_in:]) * s_x.reshape((t,) + (1,) * (acc.ndim - 1))
    block = q.block_size
    nb = codes.shape[n_in - 1] // block
    xb = xq.reshape(xq.shape[:-1] + (nb, block))
    cb = codes.reshape(codes.shape[:n_in - 1] + (nb, block) + codes.shape[n_in:])
    # Contract every input axis but the block index, then scale per block and sum.
    lead = "hijl"[:n_in - 1]
    acc = np.einsum(f"t{lead}bk,{lead}bkn->t{lead}bn", xb, cb.reshape(cb.shape[:n_in + 1] + (-1,)))
    y = (acc * scale.reshape(scale.shape[:n_in] + (-1,))).sum(axis=tuple(range(1, n_in + 1)))
    return y.reshape((t,) + tuple(q.shape[n_in:])) * s_x.reshape((t,) + (1,) * (y.ndim - 1))


def test_quantize_rows_is_per_row_absmax_rounding():
    x = np.random.default_rng(0).standard_normal((6, 300)).astype(np.float32) * np.arange(1, 7)[:, None]
    x[3] = 0.0  # an all-zero row: codes 0, scale 0
    codes, scale = quantize_rows(jnp.asarray(x))
    s = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    np.testing.assert_allclose(np.asarray(scale), s, rtol=2e-7)  # XLA may multiply by 1/127: 1 ulp
    s = np.asarray(scale)
    np.testing.assert_array_equal(np.asarray(codes), np.round(x / np.where(s > 0, s, 1)).astype(np.int8))
    assert codes.dtype == jnp.int8 and np.abs(np.asarray(codes)).max(axis=1).tolist() == [127, 127, 127, 0, 127, 127]


# (kernel shape, input axes): a plain kernel whose width is not a multiple of 32 (padded output),
# attention's out projection (two input axes, int4 blocks of 32 = head_dim), an MLP output whose
# 688 inputs are padded to 768 for int4, and a 2560-long contraction (int32 sums over chunks).
SHAPES = [((256, 200), (0,)), ((4, 32, 96), (0, 1)), ((688, 64), (0,)), ((2560, 40), (0,))]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("shape, in_axes", SHAPES)
def test_int8_matmul_equals_float64_recomputation(scheme, shape, in_axes):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32) / np.sqrt(np.prod(shape[:len(in_axes)]))
    x = rng.standard_normal((5,) + shape[:len(in_axes)]).astype(np.float32)
    q = quantize(w, scheme, in_axes=in_axes, matmul="int8")
    got = np.asarray(jax.jit(int8_matmul)(jnp.asarray(x), q), np.float64)
    ref = _reference(x, q)
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())
    # Against the float matmul of the weights q stores: the activations' rounding alone.
    exact = np.tensordot(x.astype(np.float64), np.asarray(dequantize(q), np.float64), axes=len(in_axes))
    rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert 1e-4 < rel < 2e-2, rel
    if scheme == "int8":  # and against the unquantized weights: both roundings
        full = np.tensordot(x.astype(np.float64), w.astype(np.float64), axes=len(in_axes))
        assert np.linalg.norm(got - full) / np.linalg.norm(full) < 2e-2


def test_nf4_is_dequantize_only():
    with pytest.raises(ValueError, match="nf4 is dequantize-only"):
        quantize(np.ones((64, 64), np.float32), "nf4", matmul="int8")
    with pytest.raises(ValueError, match="unknown quantized matmul"):
        quantize_params({"kernel": np.ones((64, 64), np.float32)}, "int8", matmul="int4")
    cfg = DecoderOnlyConfig(vocab_size=96, d_model=64, num_heads=2, head_dim=32, mlp_dim=128, num_layers=1)
    for kw in (dict(weight_quantization="nf4"), {}):
        with pytest.raises(ModelCapabilityError, match="quantized_matmul='int8'"):
            DecoderOnlyModel(cfg, quantized_matmul="int8", **kw)


def test_dense_general_picks_the_int8_path_and_its_gradient_is_straight_through(random_params):
    """A kernel stored with matmul="int8" goes through int8_matmul (here contracting axes that are
    not trailing); dx is the float matmul's with the dequantized kernel."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 32, 5)).astype(np.float32)  # [batch, heads, kv, length]
    mod = DenseGeneral(40, ("heads", "kv", "embed"), axis=(1, 2))
    params = random_params(mod, x)
    q = quantize(params["kernel"], "int4", in_axes=(0, 1), matmul="int8")
    got = mod.apply({"params": {"kernel": q}}, x)
    moved = np.moveaxis(x, 3, 1).reshape(-1, 4, 32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(int8_matmul(jnp.asarray(moved), q)).reshape(2, 5, 40))
    deq = {"kernel": q.replace(matmul="dequantize")}
    rel = float(jnp.linalg.norm(got - mod.apply({"params": deq}, x)) / jnp.linalg.norm(got))
    assert 1e-4 < rel < 2e-2, rel
    grad = jax.grad(lambda v, p: mod.apply({"params": p}, v).sum())
    np.testing.assert_allclose(np.asarray(grad(x, {"kernel": q})), np.asarray(grad(x, deq)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme, scan_layers", [("int8", False), ("int4", True)])
def test_model_quantized_matmul_runs_int8_activations(scheme, scan_layers, random_params):
    """`quantized_matmul="int8"` is static metadata of every QuantizedArray of param_shapes() (what
    a restore target carries); the model's logits stay close to the weight-only model's."""
    cfg = DecoderOnlyConfig(vocab_size=96, d_model=64, num_heads=2, head_dim=32, mlp_dim=176, num_layers=2,
                            mlp_activations=("silu", "linear"), scan_layers=scan_layers, tie_embeddings=False)
    kw = dict(weight_quantization=scheme, quantize_embeddings=True)
    weight_only, a8 = DecoderOnlyModel(cfg, **kw), DecoderOnlyModel(cfg, quantized_matmul="int8", **kw)
    shapes = [x for x in jax.tree_util.tree_leaves(a8.param_shapes(), is_leaf=is_q) if is_q(x)]
    assert shapes and all(x.matmul == "int8" for x in shapes)
    batch = a8.random_batch(2, 8)
    params = random_params(weight_only.module, **weight_only._inputs(batch))
    qw, qa = weight_only.quantize_params(params), a8.quantize_params(params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, qw, jax.tree_util.tree_map(  # same codes and scales
        lambda x: x.replace(matmul="dequantize") if is_q(x) else x, qa, is_leaf=is_q))
    logits_w = weight_only.compute_logits({"params": qw}, batch)
    logits_a = a8.compute_logits({"params": qa}, batch)
    rel = float(jnp.linalg.norm(logits_a - logits_w) / jnp.linalg.norm(logits_w))
    assert 1e-4 < rel < 5e-2, rel


def test_bfloat16_dense_general_runs_and_differentiates():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 64)), jnp.bfloat16)
    q = quantize(np.random.default_rng(5).standard_normal((64, 48)).astype(np.float32) / 8, "int8", matmul="int8")
    mod = DenseGeneral(48, ("embed", "mlp"), dtype=jnp.bfloat16)
    y = mod.apply({"params": {"kernel": q}}, x)
    assert y.dtype == jnp.bfloat16
    g = jax.grad(lambda v: mod.apply({"params": {"kernel": q}}, v).astype(jnp.float32).sum())(x)
    assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()
