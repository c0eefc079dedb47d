"""Dynamic int8 activations times int8 / int4 weight codes: an integer dot with int32 accumulation.

The opt-in alternative to dequantizing a kernel before a float matmul (`QuantizedArray.matmul ==
"int8"`, set by the model's `quantized_matmul`; `DenseGeneral` picks the path). Each token row of
the activations is quantized on the fly to int8 with its own absmax scale, s_x = max|x_t| / 127
(per-token dynamic-range quantization, as llama.cpp's Q8_0 activations and qwix's dynamic-range
mode do), then multiplied with the stored codes as integers:
- int8 weights (one scale s_w per output channel): y = (x_q . codes) * s_x * s_w;
- int4 weights (one scale per block of the last input axis): the codes unpacked to int8 q in
  [-7, 7], one int32 dot per block, scaled by the block's s_w, summed over blocks, times s_x.
NF4 codes index 16 non-uniform levels, so they have no integer dot: NF4 stays dequantize-only.

Why: weight-only quantization writes a float copy of every kernel at every decode step, which on
CPU makes int8 decode slower than float32; an s8 x s8 -> s32 dot reads one byte per weight and
runs on AVX512-VNNI (XLA:CPU hands it to YNNPACK). The cost is the activations' rounding (a
relative error of about 1e-2 per matmul), on top of the weights'.

Gradients are straight-through: dx = dy . W^T with W dequantized; the codes get none (frozen).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from t5x_like.layers.quantization import QuantizedArray, _unpack, dequantize

INT8_MATMUL_SCHEMES = ("int8", "int4")


def quantize_rows(x):
    """x [T, K] -> (int8 codes [T, K] in [-127, 127], float32 scale [T, 1] = absmax / 127)."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    codes = jnp.clip(jnp.round(x / jnp.where(scale > 0, scale, 1.0)), -127, 127)
    return codes.astype(jnp.int8), scale


# XLA:CPU's s8 x s8 -> s32 dot (YNNPACK here) slows down 3-5x when the output width is not a
# multiple of 32 (e.g. an MLP of 688: 47 vs 11 us at [4, 256] x [256, 688]) and about 2x when the
# contraction is longer than 2048; padding the codes' output axis and summing int32 dots over
# chunks of the input axis (both exact) avoid it (measured at batch 4, AVX512-VNNI, JAX 0.10.2).
_OUT_MULTIPLE = 32
_MAX_CONTRACTION = 2048


def _pad_out(codes):
    """codes [K, N] with N zero-padded to a multiple of _OUT_MULTIPLE."""
    return jnp.pad(codes, ((0, 0), (0, -codes.shape[1] % _OUT_MULTIPLE))) if codes.shape[1] % _OUT_MULTIPLE else codes


def _int_dot(xq, codes):
    """xq [T, K] int8 . codes [K, N'] int8 (N' padded) -> int32 [T, N']."""
    return sum(lax.dot(xq[:, c:c + _MAX_CONTRACTION], codes[c:c + _MAX_CONTRACTION], preferred_element_type=jnp.int32)
               for c in range(0, codes.shape[0], _MAX_CONTRACTION))


def _int8_weights(xq, q: QuantizedArray):
    """float32 [T, N]: (xq . codes) * s_w, for per-output-channel int8 codes."""
    codes = q.codes.reshape(int(np.prod(q.shape[:q.in_ndim])), -1)
    n = codes.shape[1]
    return _int_dot(xq, _pad_out(codes))[:, :n].astype(jnp.float32) * q.scale.reshape(1, n)


def _int4_weights(xq, q: QuantizedArray):
    """float32 [T, N]: sum over blocks of (xq . codes)[block] * s_w[block], for int4 codes."""
    nb, block = int(np.prod(q.scale.shape[:q.in_ndim])), q.block_size
    codes = _unpack(q.codes.reshape(nb * block // 2, -1), 0).astype(jnp.int8) - 8  # stored as q + 8
    n = codes.shape[1]
    codes, scale = _pad_out(codes), q.scale.reshape(nb, n)
    out = 0.0
    for b in range(nb):  # unrolled 2-D dots: XLA:CPU runs them ~2x faster than one batched dot_general
        part = slice(b * block, (b + 1) * block)
        out = out + _int_dot(xq[:, part], codes[part])[:, :n].astype(jnp.float32) * scale[b]
    return out


def _padded(x, q: QuantizedArray):
    """x [T, in...] with its last input axis zero-padded to the codes' (padded) length."""
    if q.scheme != "int4":
        return x
    pad = 2 * q.codes.shape[q.in_ndim - 1] - q.shape[q.in_ndim - 1]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x


@jax.custom_vjp
def _matmul(x, q: QuantizedArray):
    xq, xs = quantize_rows(_padded(x, q).reshape(x.shape[0], -1))
    return (_int8_weights if q.scheme == "int8" else _int4_weights)(xq, q) * xs


def _matmul_fwd(x, q):
    return _matmul(x, q), q


def _matmul_bwd(q, g):
    k = int(np.prod(q.shape[:q.in_ndim]))
    w = dequantize(q, jnp.float32).reshape(k, -1)
    return (g @ w.T).reshape((g.shape[0],) + tuple(q.shape[:q.in_ndim])), None


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def int8_matmul(x, q: QuantizedArray):
    """float32 [..., out...]: x [..., in...] (its trailing axes are the kernel's input axes)
    times the kernel `q` stores (no batch axes; int8 or int4), through int8 activations."""
    if q.scheme not in INT8_MATMUL_SCHEMES or q.batch_shape:
        raise ValueError(f"int8 activations need an unstacked int8 or int4 kernel, got {q.scheme} "
                         f"{q.full_shape} (NF4 is dequantize-only)")
    in_shape, out_shape = tuple(q.shape[:q.in_ndim]), tuple(q.shape[q.in_ndim:])
    lead = x.shape[:x.ndim - len(in_shape)]
    y = _matmul(x.reshape((-1,) + in_shape).astype(jnp.float32), q)  # float32: the custom vjp's cotangent
    return y.reshape(lead + out_shape)
