"""The grouped expert MLP's blocked method (hand-written backward pass) against jax autodiff of a
plain per-row reference: uneven expert sizes, an empty expert, sizes that are exact multiples of
the block sizes, and padding rows (expert id >= E) that must give zero output and zero gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.layers.mlp import ACTIVATION_FNS
from t5x_like.layers.moe_grouped import _block_sizes, grouped_ffn

D, F = 12, 20
SIZES = [0, 16, 45, 3, 64, 71]          # expert 0 empty; 16 and 64 whole blocks of 8, 16 and 32
E, INVALID = len(SIZES), 9


def _problem(seed=0, d_out=D, use_bias=True, num_acts=2):
    rng = np.random.default_rng(seed)
    expert = np.concatenate([np.repeat(np.arange(E), SIZES), E + rng.integers(0, 3, INVALID)])
    expert = rng.permutation(expert).astype(np.int32)
    x = rng.standard_normal((len(expert), D)).astype(np.float32)
    kernels = [0.3 * rng.standard_normal((E, D, F)) for _ in range(num_acts)]
    kernels.append(0.3 * rng.standard_normal((E, F, d_out)))
    biases = None
    if use_bias:
        biases = [0.3 * rng.standard_normal((E, F)) for _ in range(num_acts)] + [rng.standard_normal((E, d_out))]
        biases = [b.astype(np.float32) for b in biases]
    return x, expert, [k.astype(np.float32) for k in kernels], biases


def _reference(x, expert, kernels, biases, activations):
    """Row by row: each row's own expert weights gathered, invalid rows zero."""
    valid = expert < E
    e = jnp.minimum(expert, E - 1)
    hidden = None
    for i, act in enumerate(activations):
        pre = jnp.einsum("nd,ndf->nf", x, kernels[i][e], precision="highest")
        pre = pre if biases is None else pre + biases[i][e]
        a = ACTIVATION_FNS[act](pre)
        hidden = a if hidden is None else hidden * a
    y = jnp.einsum("nf,nfd->nd", hidden, kernels[-1][e], precision="highest")
    y = y if biases is None else y + biases[-1][e]
    return jnp.where(valid[:, None], y, 0.0)


def _value_and_grads(fn, x, kernels, biases, cotangent):
    loss = lambda x, k, b: jnp.sum(fn(x, k, b) * cotangent)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, kernels, biases)


@pytest.mark.parametrize("block_rows, max_block_rows, activations, use_bias, d_out", [
    (8, 32, ("silu", "linear"), True, D), (8, 32, ("silu", "linear"), False, 7), (8, 32, ("relu",), True, D),
    (16, 16, ("silu", "linear"), True, D), (128, 512, ("silu", "linear"), False, D)])
def test_blocked_gradients_equal_autodiff_of_per_row_reference(block_rows, max_block_rows, activations,
                                                               use_bias, d_out):
    x, expert, kernels, biases = _problem(d_out=d_out, use_bias=use_bias, num_acts=len(activations))
    cot = np.random.default_rng(1).standard_normal((len(expert), d_out)).astype(np.float32)
    blocked = lambda x, k, b: grouped_ffn(x, expert, k, b, activations, method="blocked",  # noqa: E731
                                          block_rows=block_rows, max_block_rows=max_block_rows)
    reference = lambda x, k, b: _reference(x, expert, k, b, activations)  # noqa: E731
    y, y_ref = jax.jit(blocked)(x, kernels, biases), reference(x, kernels, biases)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(y_ref))))
    assert np.all(np.asarray(y)[expert >= E] == 0)
    loss, grads = _value_and_grads(blocked, x, kernels, biases, cot)
    loss_ref, grads_ref = _value_and_grads(reference, x, kernels, biases, cot)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for g, g_ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(g_ref))))
    dx, dk = grads[0], grads[1]
    assert np.all(np.asarray(dx)[expert >= E] == 0)            # padding rows get no gradient
    assert all(np.all(np.asarray(k)[0] == 0) for k in dk)      # nor does the empty expert


def test_block_sizes_double_up_to_the_largest_and_cover_small_inputs():
    assert _block_sizes(8192, 128, 512) == (512, 256, 128)
    assert _block_sizes(8192, 128, 128) == (128,)
    assert _block_sizes(60, 128, 512) == (64,)               # one block covers every row
    assert _block_sizes(100, 8, 512) == (64, 32, 16, 8)
    assert _block_sizes(5, 128, 512) == (8,)
