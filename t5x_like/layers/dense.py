"""Dense projection over several axes with logical axis names on its kernel.

Flax's `nn.DenseGeneral` initialises a flattened 2-D kernel and reshapes it, which cannot carry
one logical name per kernel axis; this one builds the kernel in its real shape instead.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax import lax

from t5x_like.layers.quantization import QuantizedArray, dequantize
from t5x_like.layers.quantized_matmul import int8_matmul

Initializer = Callable[..., jnp.ndarray]
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, Sequence) else (x,)


class DenseGeneral(nn.Module):
    """y = x . W (+ b), contracting `axis` of x with the leading axes of W."""

    features: int | Sequence[int]
    kernel_axes: tuple[str, ...]
    axis: int | Sequence[int] = -1
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, x):
        features = _as_tuple(self.features)
        axis = tuple(a % x.ndim for a in _as_tuple(self.axis))
        in_shape = tuple(x.shape[a] for a in axis)
        kernel_shape = in_shape + features
        if len(self.kernel_axes) != len(kernel_shape):
            raise ValueError(f"kernel_axes {self.kernel_axes} do not match kernel shape {kernel_shape}")

        def init(key, shape, dtype):
            # Initialise as [fan_in, fan_out] so variance scaling sees the true fan-in.
            flat = self.kernel_init(key, (int(np.prod(in_shape)), int(np.prod(features))), dtype)
            return jnp.reshape(flat, shape)

        dtype = self.dtype

        def project(x, kernel):
            # Products of `dtype` inputs accumulate into float32 outputs, then round to `dtype`: the
            # bfloat16 x bfloat16 -> float32 dot is XLA:CPU's fast AVX512-BF16 kernel (0.8 vs 0.35 TFLOP/s
            # for bf16 -> bf16 here), and it is what TPU/GPU matrix units do anyway.
            x = jnp.asarray(x, dtype)
            kernel = jnp.asarray(kernel, dtype)
            if axis == tuple(range(x.ndim - len(axis), x.ndim)):
                # Contracting trailing axes: one 2-D [tokens, fan_in] x [fan_in, fan_out] matmul. XLA:CPU
                # lays out the backward pass of the equivalent N-D dot_general with transposed copies
                # of the activations; the 2-D form runs the MLP's forward+backward about 2x faster there
                # (benchmarks/README.md) and is the same dot on accelerators.
                batch_shape = x.shape[:x.ndim - len(axis)]
                flat = jnp.matmul(jnp.reshape(x, (-1, int(np.prod(in_shape)))),
                                  jnp.reshape(kernel, (int(np.prod(in_shape)), -1)), preferred_element_type=jnp.float32)
                return jnp.reshape(flat, batch_shape + features).astype(dtype)
            contract = (axis, tuple(range(len(axis))))
            return lax.dot_general(x, kernel, (contract, ((), ())), preferred_element_type=jnp.float32).astype(dtype)

        stored = self.get_variable("params", "kernel") if self.has_variable("params", "kernel") else None
        if isinstance(stored, QuantizedArray):
            # Weight-only quantized storage (layers/quantization.py): `param` would shape-check the
            # codes against the kernel, so the stored pytree is read directly. It is dequantized
            # inside jax.checkpoint with the matmul, so a backward pass keeps the codes and recomputes
            # the kernel (as bitsandbytes' 4-bit matmul does), not a full-size copy per layer.
            if stored.full_shape != kernel_shape:
                raise ValueError(f"quantized kernel of shape {stored.full_shape} does not match {kernel_shape}")
            if stored.matmul == "int8":  # int8 activations x integer codes (layers/quantized_matmul.py)
                x = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
                y = int8_matmul(x, stored).astype(dtype)
            else:
                y = jax.checkpoint(lambda x, q: project(x, dequantize(q, dtype)))(x, stored)
        else:
            kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                                kernel_shape, self.param_dtype)
            y = project(x, kernel)
        if self.use_bias:
            bias_axes = self.kernel_axes[len(in_shape):]
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, bias_axes),
                              features, self.param_dtype)
            y = y + jnp.asarray(bias, self.dtype)
        return y
