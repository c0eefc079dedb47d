"""Dropless mixture-of-experts: tokens sorted by expert through grouped matmuls, nothing dropped.

Why: the capacity path (moe.py) computes every expert's capacity slots (1.25x the routed tokens at
the default factor) and dispatches/combines them with one-hot matmuls whose size grows with
tokens x experts x capacity. Here each (token, expert) assignment is computed exactly once: the
assignments are sorted by expert (a stable argsort of the top-k choices), run through a grouped
matmul, un-sorted, and mixed with the router weights.

The grouped matmul (moe_grouped.py) is `jax.lax.ragged_dot` on TPU/GPU and a block scan on CPU,
where ragged_dot is a dense product over every expert.

Expert parallelism: when the logical axes `batch` / `expert` map to mesh axes of the active mesh
(`partitioning.activation_context`), the layer runs under `shard_map`: each device routes its own
tokens, an all-to-all over the expert axes sends every assignment to the shard that holds its
expert, the experts run on what they received, and a second all-to-all brings the results back.
Mesh axes are found through the logical-axis rules, so this module names none. Expert kernels
enter the shard_map split over the expert axes and their `mlp` axis as the rules say (tensor
parallelism: partial outputs are summed with psum); other splits (fsdp) are gathered at the
boundary. Buffers are static: each device reserves its tokens x k rows per destination, and the
block scan skips the rows nobody sent.

Not `jax.lax.ragged_all_to_all` (which would send and receive only the rows used, without the
expert-shards x tokens x k receive buffer): XLA:CPU cannot run it (jax 0.10.2: "HLO opcode
`ragged-all-to-all` is not supported by XLA:CPU"), so its equality with this path cannot be
tested here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.sharding import PartitionSpec as P

from t5x_like.errors import UserError
from t5x_like.layers.moe_grouped import grouped_ffn, grouped_method

class ExpertShardingError(UserError):
    """An expert count that the expert mesh axes cannot split evenly."""


def router_losses(logits, probs, experts):
    """Switch load balancing and router z-loss of logits / probs [G, S, E] and top-k `experts`.

    Load balancing: E * sum_e (fraction of assignments to e) * (mean probability of e), 1.0 when
    both are uniform, per group (before any capacity), then averaged over groups.
    """
    e, top_k = probs.shape[-1], experts.shape[-1]
    counts = jnp.sum(jax.nn.one_hot(experts, e, dtype=jnp.float32), axis=(1, 2))      # [G, E]
    fraction = counts / (experts.shape[1] * top_k)
    aux = jnp.mean(e * jnp.sum(fraction * jnp.mean(probs, axis=1), axis=-1))
    z = jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
    return aux, z


def routing(logits, top_k: int, renormalize: bool):
    """Top-k experts and weights of router logits [G, S, E] (float32), and the router losses."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if renormalize and top_k > 1:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    aux, z = router_losses(logits.astype(jnp.float32), probs, experts)
    return experts, weights, aux, z


def _local_moe(x, logits, kernels, biases, key, *, cfg, groups: int, ep_axes=(), ep=1, batch_axes=(),
               tensor_axes=()):
    """One device's dropless MoE: x [b, L, D] and router logits [b, L, E] of its own tokens;
    kernels hold E / ep experts. Returns (y [b, L, D], aux, z, per-expert assignment counts)."""
    b, length, d = x.shape
    e = logits.shape[-1]
    t = b * length
    experts, weights, aux, z = routing(logits.reshape(groups, t // groups, e), cfg["top_k"], cfg["renormalize"])
    experts, weights = experts.reshape(t * cfg["top_k"]), weights.reshape(t, cfg["top_k"])
    counts = jnp.zeros((e,), jnp.float32).at[experts].add(1.0)
    rows = jnp.repeat(x.reshape(t, d), cfg["top_k"], axis=0)
    reduce = (lambda y: jax.lax.psum(y, tensor_axes)) if tensor_axes else None
    run = lambda r, ex: grouped_ffn(r, ex, kernels, biases, cfg["activations"], cfg["dtype"],  # noqa: E731
                                    cfg["method"], cfg["block_rows"], cfg["dropout_rate"], key, reduce)
    if ep_axes:
        y_rows = _expert_parallel(rows, experts, run, e, ep_axes, ep)
    else:
        y_rows = run(rows, experts)
    y = jnp.einsum("tkd,tk->td", y_rows.reshape(t, cfg["top_k"], d).astype(jnp.float32), weights)
    if batch_axes:
        aux, z = jax.lax.pmean(aux, batch_axes), jax.lax.pmean(z, batch_axes)
        counts = jax.lax.psum(counts, batch_axes)
    return y.astype(cfg["dtype"]).reshape(b, length, d), aux, z, counts


def _expert_parallel(rows, experts, run, num_experts, ep_axes, ep):
    """All-to-all the rows to the shards holding their experts, run them there, bring them back.

    Each destination gets a static buffer of all N local rows (any one shard may receive them
    all); unused slots carry expert id E_local, which the grouped matmul skips.
    """
    n, d = rows.shape
    local_e = num_experts // ep
    dest, expert_local = experts // local_e, experts % local_e
    order = jnp.argsort(dest, stable=True)
    per_dest = jnp.zeros((ep,), jnp.int32).at[dest].add(1)
    start = jnp.cumsum(per_dest) - per_dest
    rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    slot = rank - start[dest]                                        # row's place in its destination
    send = jnp.zeros((ep, n, d), rows.dtype).at[dest, slot].set(rows)
    send_e = jnp.full((ep, n), local_e, jnp.int32).at[dest, slot].set(expert_local)
    recv = jax.lax.all_to_all(send, ep_axes, 0, 0, tiled=True)
    recv_e = jax.lax.all_to_all(send_e, ep_axes, 0, 0, tiled=True)
    out = run(recv.reshape(ep * n, d), recv_e.reshape(ep * n)).reshape(ep, n, -1)
    back = jax.lax.all_to_all(out, ep_axes, 0, 0, tiled=True)
    return back[dest, slot]


def _mesh_axes(logical: str, mesh) -> tuple[str, ...]:
    """Mesh axes (of size > 1) that the active logical-axis rules give `logical`."""
    spec = nn.logical_to_mesh_axes((logical,))
    entry = spec[0] if spec is not None and len(spec) else None
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)


def dropless_moe(x, logits, kernels, biases, key, *, top_k, renormalize, activations, dtype, groups,
                 method="auto", block_rows=128, dropout_rate=0.0):
    """Dropless MoE of x [B, L, D] with router logits [B, L, E]; sharded over the active mesh when
    there is one. Returns (y, aux loss, z-loss, assignments per expert [E])."""
    cfg = dict(top_k=top_k, renormalize=renormalize, activations=tuple(activations), dtype=dtype,
               method=grouped_method(method), block_rows=block_rows, dropout_rate=dropout_rate)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return _local_moe(x, logits, kernels, biases, key, cfg=cfg, groups=groups)
    num_experts = logits.shape[-1]
    batch_axes, ep_axes = _mesh_axes("batch", mesh), _mesh_axes("expert", mesh)
    tensor_axes = _mesh_axes("mlp", mesh)
    ep = math.prod(mesh.shape[a] for a in ep_axes)
    if num_experts % ep:
        raise ExpertShardingError(f"num_experts={num_experts} cannot be split over the {ep} expert-parallel "
                                  f"shards of mesh {dict(mesh.shape)}; use a mesh whose expert axis divides it")
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    if x.shape[0] % shards or groups % shards:   # e.g. init's one-row batch: let pjit place it
        return _local_moe(x, logits, kernels, biases, key, cfg=cfg, groups=groups)
    bspec = P(batch_axes or None)
    tspec = tensor_axes or None
    wspecs = [P(ep_axes or None, None, tspec) for _ in kernels[:-1]] + [P(ep_axes or None, tspec, None)]
    bias_specs = P() if biases is None else \
        [P(ep_axes or None, tspec) for _ in biases[:-1]] + [P(ep_axes or None, None)]
    # A different dropout mask on every device.
    body = lambda x, lg, k, b, kk: _local_moe(  # noqa: E731
        x, lg, k, b, None if kk is None else jax.random.fold_in(kk, _linear_index(mesh)), cfg=cfg,
        groups=groups // shards, ep_axes=ep_axes, ep=ep, batch_axes=batch_axes, tensor_axes=tensor_axes)
    return jax.shard_map(body, in_specs=(bspec, bspec, wspecs, bias_specs, P()),
                         out_specs=(bspec, P(), P(), P()))(x, logits, list(kernels), biases, key)


def _linear_index(mesh):
    return jax.lax.axis_index(tuple(mesh.axis_names))
