"""Cross-entropy fused with the output projection, chunk by chunk, gradients computed on the way.

The plain path materialises float32 logits [batch, length, vocab] (537 MB for 8 x 512 x 32k), then
log-probabilities, then their gradient and a transposed copy of it for the weight gradient: about
2 GB of temporaries that are each written once and read once, which on a CPU costs more than the
two matmuls around them. Here the sequence is cut into chunks along `length` (batch sharding is
kept); each chunk's logits live only inside one `lax.scan` iteration, and since the loss is a sum,
its gradients with respect to the hidden states, the projection and its bias are computed right
there, scaled by the incoming cotangent in the backward pass. No logits are recomputed.

Positions with zero weight need no logits. When every row's weighted positions fit a fraction of
the length (masked-LM's 15%, prefix-LM's targets), they are gathered into that many positions first,
so the projection, softmax and both gradient products run on those alone; `lax.switch` picks the
smallest capacity that holds every row at run time, and the full length otherwise, so the result
never depends on the choice. Original BERT trained the same way (`max_predictions_per_seq`).

Only the returned `loss` sum is differentiable; `nll_sum`, `z_loss`, `tokens` and `correct` are
statistics (gradient-stopped). The result equals `cross_entropy.cross_entropy_sums` on the full logits.
A model describes its projection as an `OutputHead` (models own which parameters those are).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.objectives.cross_entropy import smoothing_constants
from t5x_like.objectives.metrics import SUM_KEYS


class OutputHead(NamedTuple):
    """logits = (hidden * scale) . weight (+ bias): the projection a fused loss applies itself.
    weight is [vocab, embed] when `vocab_major` (a tied embedding table), else [embed, vocab]."""

    weight: jax.Array
    bias: Optional[jax.Array] = None
    vocab_major: bool = False
    scale: Optional[float] = None


# Masked-LM rows carry about 15% weighted positions, prefix-LM and padded rows about half.
COMPACT_FRACTIONS = (0.25, 0.5)


def chunk_length(length: int, batch: int, vocab: int, max_bytes: int = 64 * 2 ** 20) -> int:
    """The largest divisor of `length` whose float32 chunk logits [batch, chunk, vocab] fit `max_bytes`
    (at least 1). 64 MiB: on CPU, 32 MiB chunks made the projection's matmuls too thin (8% slower
    steps) and 128 MiB gained nothing (benchmarks/README.md)."""
    best = 1
    for c in range(1, length + 1):
        if length % c == 0 and batch * c * vocab * 4 <= max_bytes:
            best = c
    return best


def compact_capacities(length: int, fractions) -> tuple[int, ...]:
    """Row capacities, ascending and below `length`, for the compact paths: ceil(fraction x length),
    rounded up to a multiple of 8 past 8 so the chunk matmuls stay wide."""
    caps = set()
    for f in fractions:
        c = int(np.ceil(f * length))
        caps.add(-(-c // 8) * 8 if c > 8 else c)
    return tuple(sorted(c for c in caps if 0 < c < length))


def compact_branch(weights, capacities) -> jax.Array:
    """Index of the smallest capacity holding every row's nonzero weights (len(capacities): none)."""
    most = jnp.max(jnp.sum(weights != 0, axis=-1))
    return sum((most > c).astype(jnp.int32) for c in capacities) + jnp.int32(0)


def _first_argmax(logits, row_max):
    """jnp.argmax (the first index of the maximum) as one min-reduction: XLA:CPU runs argmax's
    (value, index) pair reduction about 10x slower than this over a 32k vocabulary."""
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(logits == row_max[..., None], iota, logits.shape[-1]), axis=-1)


def _chunk_loss_and_grads(x, weight, bias, targets, weights, static):
    """One chunk: (sums, dx, dweight, dbias) of sum_t weights_t * loss_t. x [B, c, D]."""
    vocab_major, scale, z_loss, label_smoothing = static
    xs = x if scale is None else x * jnp.asarray(scale, x.dtype)
    w = weight.astype(x.dtype)
    spec = "bcd,vd->bcv" if vocab_major else "bcd,dv->bcv"
    logits = jnp.einsum(spec, xs, w, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    vocab = logits.shape[-1]
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    lse = (m + jnp.log(s))[..., 0]
    probs = e / s
    onehot = jax.nn.one_hot(targets, vocab, dtype=jnp.float32)
    target_logit = jnp.sum(logits * onehot, axis=-1)
    nll = lse - target_logit
    ce, dce = nll, probs - onehot
    if label_smoothing:
        confidence, low, entropy = smoothing_constants(vocab, label_smoothing)
        sum_log_probs = jnp.sum(logits, axis=-1) - vocab * lse
        ce = (confidence - low) * nll - low * sum_log_probs - entropy
        dce = (confidence - low) * dce - low * (1.0 - vocab * probs)
    z = z_loss * jnp.square(lse)
    dlogits = (dce + (2.0 * z_loss) * lse[..., None] * probs) * weights[..., None]
    sums = {"loss": jnp.sum((ce + z) * weights), "nll_sum": jnp.sum(nll * weights),
            "z_loss": jnp.sum(z * weights), "tokens": jnp.sum(weights),
            "correct": jnp.sum((_first_argmax(logits, m[..., 0]) == targets) * weights)}
    dl = dlogits.astype(x.dtype)
    dx = jnp.einsum("bcv,vd->bcd" if vocab_major else "bcv,dv->bcd", dl, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum("bcv,bcd->vd" if vocab_major else "bcd,bcv->dv", *((dl, xs) if vocab_major else (xs, dl)),
                    preferred_element_type=jnp.float32)
    if scale is not None:
        dx = dx * scale
    dbias = None if bias is None else jnp.sum(dlogits, axis=(0, 1))
    return sums, dx.astype(x.dtype), dw, dbias


def _scan_chunks(x, weight, bias, targets, weights, static, chunk):
    """Sums, dx, dweight, dbias over all chunks of the length axis."""
    b, length, d = x.shape
    n = length // chunk
    split = lambda a: jnp.swapaxes(a.reshape((b, n, chunk) + a.shape[2:]), 0, 1)  # noqa: E731

    def body(carry, xs):
        sums, dw, db = carry
        x_c, t_c, w_c = xs
        s, dx_c, dw_c, db_c = _chunk_loss_and_grads(x_c, weight, bias, t_c, w_c, static)
        sums = {k: sums[k] + s[k] for k in sums}
        return (sums, dw + dw_c, None if db is None else db + db_c), dx_c

    zeros = {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}
    init = (zeros, jnp.zeros(weight.shape, jnp.float32),
            None if bias is None else jnp.zeros(bias.shape, jnp.float32))
    (sums, dw, db), dx = jax.lax.scan(body, init, (split(x), split(targets), split(weights)))
    dx = jnp.swapaxes(dx, 0, 1).reshape(b, length, d)
    return sums, dx, dw, db


def _compact_scan(x, weight, bias, targets, weights, static, capacity):
    """_scan_chunks over each row's first `capacity` nonzero-weight positions (the caller checked that
    they hold all of them); dx is scattered back, zero elsewhere."""
    b, vocab = x.shape[0], weight.shape[0 if static[0] else 1]
    order = jnp.argsort((weights == 0).astype(jnp.int32), axis=-1, stable=True)[:, :capacity]
    take = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)  # noqa: E731
    sums, dx_c, dw, db = _scan_chunks(take(x), weight, bias, take(targets), take(weights), static,
                                      chunk_length(capacity, b, vocab))
    dx = jnp.zeros_like(x).at[jnp.arange(b)[:, None], order].set(dx_c, unique_indices=True)
    return sums, dx, dw, db


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused(x, weight, bias, targets, weights, static, chunk, capacities):
    return _fused_fwd(x, weight, bias, targets, weights, static, chunk, capacities)[0]


def _fused_fwd(x, weight, bias, targets, weights, static, chunk, capacities):
    args = (x, weight, bias, targets, weights, static)
    full = lambda: _scan_chunks(*args, chunk)  # noqa: E731
    if capacities:
        branches = [functools.partial(_compact_scan, *args, c) for c in capacities] + [full]
        sums, dx, dw, db = jax.lax.switch(compact_branch(weights, capacities), branches)
    else:
        sums, dx, dw, db = full()
    return sums, (dx, dw.astype(weight.dtype), None if db is None else db.astype(bias.dtype))


def _fused_bwd(static, chunk, capacities, residuals, cotangent):
    g = cotangent["loss"]  # the statistics are gradient-stopped by the caller
    scaled = lambda a: None if a is None else g.astype(a.dtype) * a  # noqa: E731
    return tuple(scaled(a) for a in residuals) + (None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_cross_entropy_sums(hidden, head: OutputHead, targets, weights, *, z_loss: float = 0.0,
                             label_smoothing: float = 0.0, chunk: Optional[int] = None,
                             compact_fractions: tuple[float, ...] = COMPACT_FRACTIONS) -> dict:
    """`cross_entropy.cross_entropy_sums(project(hidden), ...)` without materialising the logits.

    hidden [batch, length, embed] (the network's output before the projection); `chunk` positions
    per scan step on the full path (default: `chunk_length`, a divisor of length);
    `compact_fractions` the row capacities tried first, as fractions of length (() for none).
    """
    b, length, _ = hidden.shape
    vocab = head.weight.shape[0 if head.vocab_major else 1]
    chunk = chunk or chunk_length(length, b, vocab)
    if length % chunk:
        raise ValueError(f"loss chunk {chunk} does not divide the sequence length {length}; pick a divisor")
    static = (bool(head.vocab_major), head.scale, float(z_loss), float(label_smoothing))
    sums = _fused(hidden, head.weight, head.bias, jnp.asarray(targets, jnp.int32),
                  jnp.asarray(weights, jnp.float32), static, chunk, compact_capacities(length, compact_fractions))
    return {k: v if k == "loss" else jax.lax.stop_gradient(v) for k, v in sums.items()}
