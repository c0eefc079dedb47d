"""Grouped expert MLP: each row through the expert it was routed to, no capacity, no one-hot.

Two methods, equal up to float rounding:
- "ragged": rows sorted by expert through `jax.lax.ragged_dot` (a native grouped GEMM on TPU/GPU;
  XLA:CPU lowers it to a masked dense product over every expert, num_experts x the work);
- "blocked" (the CPU default): rows padded per expert to whole blocks of `block_rows`, a scan runs
  each used block through its expert's weights (empty trailing blocks skipped). Its backward pass
  is written by hand (custom_vjp): autodiff of the scan's dynamic weight slice materialised a
  zero gradient of every expert per block (2x slower steps); here each block's weight gradient is
  added in place into a float32 accumulator.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from t5x_like.layers.mlp import ACTIVATION_FNS

GROUPED_METHODS = ("auto", "blocked", "ragged")


def grouped_method(method: str = "auto") -> str:
    """'auto': the block scan on CPU (ragged_dot is dense there), ragged_dot elsewhere."""
    if method not in GROUPED_METHODS:
        raise ValueError(f"grouped matmul method {method!r}; use one of {GROUPED_METHODS}")
    if method == "auto":
        return "blocked" if jax.default_backend() == "cpu" else "ragged"
    return method


def grouped_ffn(x_rows, expert, kernels: Sequence, biases: Optional[Sequence], activations: Sequence[str],
                dtype=jnp.float32, method: str = "auto", block_rows: int = 128, dropout_rate: float = 0.0,
                dropout_key=None, reduce=None):
    """Expert MLP of each row: x_rows [N, D] through expert `expert[n]` (values >= E: padding rows,
    output zero). kernels: wi... [E, D, F] and wo [E, F, D_out]; biases [E, F]..., [E, D_out] or
    None. `reduce` (a psum over tensor-parallel shards) is applied to the partial output before
    wo's bias. Returns [N, D_out] in `dtype`.
    """
    e = kernels[0].shape[0]
    order = jnp.argsort(expert, stable=True)              # invalid rows (expert >= E) last
    sizes = jnp.zeros((e,), jnp.int32).at[expert].add(1, mode="drop")
    valid = expert < e
    x_rows = jnp.where(valid[:, None], x_rows, 0).astype(dtype)
    kernels = [jnp.asarray(k, dtype) for k in kernels]
    in_biases = None if biases is None else [jnp.asarray(b, dtype) for b in biases[:-1]]
    drop = _dropout(dropout_rate, dropout_key)
    if grouped_method(method) == "ragged":
        y = _ragged(x_rows, expert, order, sizes, kernels, in_biases, tuple(activations), dtype, drop)
    else:
        y = _blocked(x_rows, expert, order, sizes, kernels, in_biases, tuple(activations), dtype, block_rows, drop)
    y = y if reduce is None else reduce(y)
    if biases is not None:
        y = y + jnp.asarray(biases[-1], jnp.float32)[jnp.minimum(expert, e - 1)]
    return jnp.where(valid[:, None], y, 0).astype(dtype)


def _dropout(rate, key):
    """mask(shape, salt) -> keep mask scaled by 1 / (1 - rate), or None without dropout."""
    if key is None or rate == 0.0:
        return None
    keep = 1.0 - rate
    return lambda shape, salt: jax.random.bernoulli(jax.random.fold_in(key, salt), keep, shape) / keep


def _varying(tree, *refs):
    """`tree` cast to vary over every manual mesh axis any of `refs` varies over (inside shard_map
    both branches of a cond must agree; outside it this is the identity)."""
    axes = set()
    for r in jax.tree_util.tree_leaves(refs):
        axes |= _vma(r)

    def cast(x):
        missing = tuple(sorted(axes - _vma(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree_util.tree_map(cast, tree)


def _vma(x) -> set:
    """The manual mesh axes `x` varies over (empty outside shard_map)."""
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return set(getattr(mat, "varying", ()))


def _cond(pred, run, skip, operand, *refs):
    """lax.cond whose branch outputs are cast to the same varying mesh axes."""
    return jax.lax.cond(pred, lambda o: _varying(run(o), o, *refs), lambda o: _varying(skip(o), o, *refs), operand)


def _hidden(x, wis, bis, activations, dtype):
    """Pre-activations of each input projection (float32 accumulation, stored in `dtype`)."""
    pres = []
    for i in range(len(activations)):
        h = jnp.matmul(x, wis[i], preferred_element_type=jnp.float32).astype(dtype)
        pres.append(h if bis is None else h + bis[i])
    return pres


def _gate(pres, activations):
    out = None
    for pre, act in zip(pres, activations):
        a = ACTIVATION_FNS[act](pre)
        out = a if out is None else out * a
    return out


def _ragged(x_rows, expert, order, sizes, kernels, biases, activations, dtype, drop):
    e = kernels[0].shape[0]
    xs, se = x_rows[order], jnp.minimum(expert[order], e - 1)
    pres = []
    for i in range(len(activations)):
        h = jax.lax.ragged_dot(xs, kernels[i], sizes, preferred_element_type=jnp.float32).astype(dtype)
        pres.append(h if biases is None else h + biases[i][se])
    hidden = _gate(pres, activations)
    if drop is not None:
        hidden = (hidden * drop(hidden.shape, 0)).astype(dtype)
    ys = jax.lax.ragged_dot(hidden, kernels[-1], sizes, preferred_element_type=jnp.float32)
    return jnp.zeros_like(ys).at[order].set(ys)


def _blocked(x_rows, expert, order, sizes, kernels, biases, activations, dtype, block, drop):
    """Rows laid out per expert in whole blocks; `_block_scan` runs the used blocks."""
    n, d = x_rows.shape
    e = kernels[0].shape[0]
    block = max(8, min(block, 1 << max(0, (n - 1).bit_length())))
    num_blocks = (n + e * (block - 1)) // block            # sum_e ceil(size_e / block) never exceeds it
    padded = (sizes + block - 1) // block * block
    pad_end = jnp.cumsum(padded)
    pad_start, start = pad_end - padded, jnp.cumsum(sizes) - sizes
    rows = jnp.arange(num_blocks * block)
    row_expert = jnp.minimum(jnp.searchsorted(pad_end, rows, side="right"), e - 1)
    r = rows - pad_start[row_expert]
    row_valid = (rows < pad_end[-1]) & (r < sizes[row_expert])
    src = jnp.where(row_valid, order[jnp.minimum(start[row_expert] + r, n - 1)], n)
    xp = x_rows.at[src].get(mode="fill", fill_value=0).reshape(num_blocks, block, d)
    mask = None
    if drop is not None:
        mask = drop((num_blocks, block, kernels[-1].shape[1]), 0).astype(dtype)
    block_expert = row_expert[::block]
    # Under shard_map every float input varies over the same mesh axes as the others (so the hand-
    # written backward pass returns cotangents of its inputs' types; autodiff of the cast sums them).
    xp, kernels, biases, mask = _varying((xp, list(kernels), biases, mask), xp, kernels, biases, mask, block_expert)
    yp = _block_scan(activations, dtype, xp, block_expert, pad_end[-1] // block, kernels, biases, mask)
    # Row n sits at padded position pad_start[e] + (its rank within expert e).
    rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    ec = jnp.minimum(expert, e - 1)
    slot = jnp.where(expert < e, pad_start[ec] + rank - start[ec], num_blocks * block)
    return yp.reshape(num_blocks * block, -1).at[slot].get(mode="fill", fill_value=0)


def _block_forward(activations, dtype, xp, block_expert, used, kernels, biases, mask):
    """yp [nb, B, D_out] (float32) and the pre-activations [act][nb, B, F] for the backward pass."""
    f, d_out = kernels[-1].shape[1:]
    nb, block, _ = xp.shape

    def body(_, inp):
        xb, be, b, mb = inp

        def run(xb):
            pres = _hidden(xb, [k[be] for k in kernels[:-1]], None if biases is None else [bb[be] for bb in biases],
                           activations, dtype)
            hidden = _gate(pres, activations)
            hidden = hidden if mb is None else hidden * mb
            return jnp.matmul(hidden, kernels[-1][be], preferred_element_type=jnp.float32), pres

        skip = lambda xb: (jnp.zeros((block, d_out), jnp.float32),  # noqa: E731
                           [jnp.zeros((block, f), dtype) for _ in activations])
        return None, _cond(b < used, run, skip, xb, be, kernels, biases, mb)

    _, (yp, pres) = jax.lax.scan(body, None, (xp, block_expert, jnp.arange(nb), mask))
    return yp, pres


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _block_scan(activations, dtype, xp, block_expert, used, kernels, biases, mask):
    return _block_forward(activations, dtype, xp, block_expert, used, kernels, biases, mask)[0]


def _block_scan_fwd(activations, dtype, xp, block_expert, used, kernels, biases, mask):
    yp, pres = _block_forward(activations, dtype, xp, block_expert, used, kernels, biases, mask)
    return yp, (xp, block_expert, used, kernels, biases, mask, pres)


def _block_scan_bwd(activations, dtype, res, dyp):
    xp, block_expert, used, kernels, biases, mask, pres = res
    nb, block, d = xp.shape
    wis, wo = kernels[:-1], kernels[-1]

    def grads(inp):
        """One block's input gradient and weight (and bias) gradients, float32."""
        xb, be, dy, mb, pre = inp
        dy = dy.astype(dtype)
        gate, gate_vjp = jax.vjp(lambda *p: _gate(p, activations), *pre)
        hidden = gate if mb is None else gate * mb
        dwo = jnp.matmul(hidden.T, dy, preferred_element_type=jnp.float32)
        dh = jnp.matmul(dy, wo[be].T, preferred_element_type=jnp.float32).astype(dtype)
        dpres = gate_vjp(dh if mb is None else dh * mb)
        dx = sum(jnp.matmul(dp, w[be].T, preferred_element_type=jnp.float32) for dp, w in zip(dpres, wis))
        dws = [jnp.matmul(xb.T, dp, preferred_element_type=jnp.float32) for dp in dpres]
        dbs = [jnp.sum(dp.astype(jnp.float32), axis=0) for dp in dpres]
        return dx, dws + [dwo], dbs

    def skip(inp):
        return (jnp.zeros((block, d), jnp.float32), [jnp.zeros(w.shape[1:], jnp.float32) for w in kernels],
                [jnp.zeros((w.shape[-1],), jnp.float32) for w in wis])

    def body(acc, inp):
        b, be = inp[0], inp[2]
        dx, dws, dbs = _cond(b < used, grads, skip, inp[1:], kernels)
        dk, db = acc
        dk = [a.at[be].add(g) for a, g in zip(dk, dws)]
        db = [a.at[be].add(g) for a, g in zip(db, dbs)]
        return (dk, db), dx

    acc = _varying(([jnp.zeros(k.shape, jnp.float32) for k in kernels],
                    [jnp.zeros((k.shape[0], k.shape[-1]), jnp.float32) for k in wis]), xp, kernels, dyp, block_expert)
    (dk, db), dxp = jax.lax.scan(body, acc, (jnp.arange(nb), xp, block_expert, dyp, mask, pres))
    dk = [g.astype(k.dtype) for g, k in zip(dk, kernels)]
    db = None if biases is None else [g.astype(bb.dtype) for g, bb in zip(db, biases)]
    return (dxp.astype(xp.dtype), None, None, dk, db, None if mask is None else jnp.zeros_like(mask))


_block_scan.defvjp(_block_scan_fwd, _block_scan_bwd)
