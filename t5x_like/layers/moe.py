"""Mixture-of-experts feed-forward block: top-k tokens-choose routing with expert capacity.

Tokens are split into groups (by default one group per batch row). Within a group every token picks
its top-k experts by router probability; each expert takes at most `capacity` tokens per group and
the rest of its assignments are dropped (the residual connection carries those tokens on unchanged).
Priority is rank-major: all first choices of the group, in token order, before any second choice,
so a token loses its second expert before another token loses its first (as in GShard/Switch).

Dispatch and combine are one-hot einsums ([group, token, expert, capacity]), so the expert inputs
[expert, group, capacity, embed] can be sharded over the `expert` mesh axis and XLA inserts the
all-to-alls. Router losses and metrics are sown into the 'intermediates' collection under the names
in `MOE_LOSS_KEYS` / `MOE_METRIC_KEYS`; `collect_moe_aux` reduces them over layers.

`MoeMlp(impl="dropless")` (the default) routes the same way without capacity: tokens sorted by
expert through grouped matmuls, with expert parallelism over all-to-all (moe_dropless.py).
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from t5x_like.layers.dense import DenseGeneral
from t5x_like.layers.mlp import ACTIVATION_FNS
from t5x_like.layers.moe_dropless import dropless_moe, router_losses

# Losses are summed over MoE layers (each layer's router is regularised), metrics averaged.
MOE_LOSS_KEYS = ("moe_aux_loss", "moe_z_loss")
MOE_METRIC_KEYS = ("moe_dropped_fraction", "moe_expert_usage_max", "moe_expert_usage_min")

# Names of expert parameters inside an `mlp` module: `wi`, `wi_0`, `wo` (kernels) and their `*_bias`.
# Stored without a `kernel` level, so FLOP counts and upcycling recognise them by this pattern.
EXPERT_PARAM_RE = re.compile(r"(w[io](?:_\d+)?)(_bias)?")

# Expert kernels [expert, fan_in, fan_out]: variance scaling per expert, as a dense kernel would get.
expert_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                      in_axis=-2, out_axis=-1, batch_axis=(0,))


def expert_capacity(tokens_per_group: int, num_experts: int, top_k: int,
                    capacity_factor: Optional[float]) -> int:
    """Slots per expert and group: ceil(factor * tokens * k / experts), at most the group size.

    None means no dropping: a token picks distinct experts, so no expert ever gets more than
    `tokens_per_group` assignments.
    """
    if capacity_factor is None:
        return tokens_per_group
    return max(1, min(tokens_per_group, math.ceil(capacity_factor * tokens_per_group * top_k / num_experts)))


def route(router_logits, top_k: int, capacity: int, renormalize: bool = True) -> dict:
    """Routing of router_logits [G, S, E] (float32).

    Returns dispatch and combine [G, S, E, C] (combine = dispatch x the token's weight for that
    expert), the top-k `experts` / `weights` [G, S, k], `kept` [G, S, k] (assignment within
    capacity) and the router losses/metrics. With `renormalize` and k > 1 the top-k probabilities
    are rescaled to sum to one (Mixtral, GShard); k = 1 always keeps the raw probability so the
    router gets a gradient through the output (Switch).
    """
    g, s, e = router_logits.shape
    logits = router_logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)                     # [G, S, k]
    if renormalize and top_k > 1:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    choice = jax.nn.one_hot(experts, e, dtype=jnp.int32)               # [G, S, k, E]

    # Slot of each assignment in its expert's buffer, counting rank-major then token order.
    rank_major = jnp.swapaxes(choice, 1, 2).reshape(g, top_k * s, e)
    slots = jnp.cumsum(rank_major, axis=1) - 1
    slots = jnp.swapaxes(slots.reshape(g, top_k, s, e), 1, 2)         # [G, S, k, E]
    slot = jnp.sum(slots * choice, axis=-1)                           # [G, S, k]
    kept = slot < capacity

    keep = kept.astype(jnp.float32)[..., None, None]
    assign = choice.astype(jnp.float32)[..., None] * jax.nn.one_hot(slot, capacity)[..., None, :] * keep
    dispatch = jnp.sum(assign, axis=2)                                 # [G, S, E, C]
    combine = jnp.sum(assign * weights[..., None, None], axis=2)

    aux, z = router_losses(logits, probs, experts)
    per_expert = jnp.sum(dispatch, axis=(0, 1, 3))                     # kept assignments per expert
    usage = per_expert / jnp.maximum(jnp.sum(per_expert), 1.0)
    return {"dispatch": dispatch, "combine": combine, "experts": experts, "weights": weights, "kept": kept,
            "moe_aux_loss": aux, "moe_z_loss": z,
            "moe_dropped_fraction": jnp.mean(jnp.logical_not(kept).astype(jnp.float32)),
            "moe_expert_usage_max": jnp.max(usage), "moe_expert_usage_min": jnp.min(usage)}


class MoeMlp(nn.Module):
    """Drop-in replacement for `Mlp`: a router and `num_experts` copies of its projections.

    Params: `router/kernel` [embed, expert]; expert kernels `wi` (or `wi_0`, `wi_1`, ...)
    [expert, embed, mlp] and `wo` [expert, mlp, embed], stored directly (no `kernel` level) with
    `<name>_bias` [expert, features] when use_bias. Names follow `Mlp`, so sparse upcycling copies
    `mlp/wi_0/kernel` into `mlp/wi_0`.
    """

    num_experts: int
    mlp_dim: int
    activations: Sequence[str] = ("relu",)
    top_k: int = 1
    # "dropless": sorted tokens and grouped matmuls (moe_dropless.py); "capacity": one-hot dispatch
    # with capacity_factor and group_size (Switch/GShard reproductions).
    impl: str = "dropless"
    grouped_matmul: str = "auto"   # dropless only: "auto", "blocked" (the CPU scan) or "ragged"
    capacity_factor: Optional[float] = 1.25
    group_size: Optional[int] = None
    renormalize_top_k: bool = True
    use_bias: bool = False
    dropout_rate: float = 0.0
    deterministic: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _expert_dense(self, name, x, in_axis, out_axis, features, spec):
        kernel = self.param(name, nn.with_logical_partitioning(expert_kernel_init, ("expert", in_axis, out_axis)),
                            (self.num_experts, x.shape[-1], features), self.param_dtype)
        # One batched matmul per expert over all its slots ([E, G*C, D] x [E, D, F]): the 4-D einsum
        # made XLA:CPU transpose-copy activations in the backward pass (3x slower MoE steps).
        e, g, c, d = x.shape
        y = jnp.matmul(x.reshape(e, g * c, d), jnp.asarray(kernel, self.dtype), preferred_element_type=jnp.float32)
        y = y.reshape(e, g, c, features).astype(self.dtype)
        if self.use_bias:
            bias = self.param(f"{name}_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("expert", out_axis)),
                              (self.num_experts, features), self.param_dtype)
            y = y + jnp.asarray(bias, self.dtype)[:, None, None, :]
        return nn.with_logical_constraint(y, spec)

    @nn.compact
    def __call__(self, x):
        batch, length, d = x.shape
        e = self.num_experts
        if self.group_size is None:
            xg = x
        else:
            if (batch * length) % self.group_size:
                raise ValueError(f"moe_group_size={self.group_size} does not divide the {batch * length} tokens "
                                 f"of a [{batch}, {length}] batch; pick a divisor of batch x length")
            xg = x.reshape(batch * length // self.group_size, self.group_size, d)
        xg = nn.with_logical_constraint(jnp.asarray(xg, self.dtype), ("batch", "length", "embed"))
        g, s, _ = xg.shape
        logits = DenseGeneral(e, ("embed", "expert"), dtype=jnp.float32, param_dtype=self.param_dtype,
                              name="router")(jnp.asarray(xg, jnp.float32))
        if self.impl == "dropless":
            return self._dropless(x, logits.reshape(batch, length, e), g)
        capacity = expert_capacity(s, e, self.top_k, self.capacity_factor)
        r = route(logits, self.top_k, capacity, self.renormalize_top_k)
        for key in MOE_LOSS_KEYS + MOE_METRIC_KEYS:
            self.sow("intermediates", key, r[key])

        expert_spec = ("expert", "expert_group", None, "embed")
        hidden_spec = ("expert", "expert_group", None, "mlp")
        # A one-hot dispatch sums one token per slot, exact in any dtype: no float32 accumulation
        # (XLA:CPU runs this dot outside its fast kernels, where bf16 x bf16 -> f32 is unsupported).
        inputs = jnp.einsum("gsec,gsd->egcd", r["dispatch"].astype(self.dtype), xg)
        inputs = nn.with_logical_constraint(inputs, expert_spec)
        hidden = None
        for i, act in enumerate(self.activations):
            name = "wi" if len(self.activations) == 1 else f"wi_{i}"
            h = ACTIVATION_FNS[act](self._expert_dense(name, inputs, "embed", "mlp", self.mlp_dim, hidden_spec))
            hidden = h if hidden is None else hidden * h
        hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=self.deterministic)
        out = self._expert_dense("wo", hidden, "mlp", "embed", d, expert_spec)
        y = jnp.einsum("egcd,gsec->gsd", out, r["combine"].astype(self.dtype),
                       preferred_element_type=jnp.float32).astype(self.dtype)
        y = nn.with_logical_constraint(y, ("batch", "length", "embed"))
        return y.reshape(batch, length, d)


    def _expert_params(self, d):
        """Kernels (wi..., wo) and biases (or None) as `_expert_dense` declares them."""
        names = ["wi"] if len(self.activations) == 1 else [f"wi_{i}" for i in range(len(self.activations))]
        shapes = [(name, d, self.mlp_dim, ("expert", "embed", "mlp")) for name in names]
        shapes.append(("wo", self.mlp_dim, d, ("expert", "mlp", "embed")))
        kernels = [self.param(n, nn.with_logical_partitioning(expert_kernel_init, axes), (self.num_experts, i, o),
                              self.param_dtype) for n, i, o, axes in shapes]
        if not self.use_bias:
            return kernels, None
        biases = [self.param(f"{n}_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("expert", axes[2])),
                             (self.num_experts, o), self.param_dtype) for n, _, o, axes in shapes]
        return kernels, biases

    def _dropless(self, x, logits, groups):
        kernels, biases = self._expert_params(x.shape[-1])
        rate = 0.0 if self.deterministic else self.dropout_rate
        key = self.make_rng("dropout") if rate > 0 else None
        x = nn.with_logical_constraint(jnp.asarray(x, self.dtype), ("batch", "length", "embed"))
        y, aux, z, counts = dropless_moe(
            x, logits, kernels, biases, key, top_k=self.top_k, renormalize=self.renormalize_top_k,
            activations=self.activations, dtype=self.dtype, groups=groups, method=self.grouped_matmul,
            dropout_rate=rate)
        usage = counts / jnp.maximum(jnp.sum(counts), 1.0)
        stats = {"moe_aux_loss": aux, "moe_z_loss": z, "moe_dropped_fraction": jnp.zeros((), jnp.float32),
                 "moe_expert_usage_max": jnp.max(usage), "moe_expert_usage_min": jnp.min(usage)}
        for key_name in MOE_LOSS_KEYS + MOE_METRIC_KEYS:
            self.sow("intermediates", key_name, stats[key_name])
        return nn.with_logical_constraint(y, ("batch", "length", "embed"))


def collect_moe_aux(intermediates: Mapping) -> dict:
    """Router losses (summed over MoE layers) and metrics (averaged) from an 'intermediates' tree.

    Empty when the model has no MoE layer. Scanned layers contribute one value per layer.
    """
    found: dict[str, list] = {k: [] for k in MOE_LOSS_KEYS + MOE_METRIC_KEYS}
    for path, leaf in jax.tree_util.tree_leaves_with_path(intermediates):
        keys = [getattr(p, "key", None) for p in path]
        for k in found:
            if k in keys:
                found[k].append(jnp.ravel(jnp.asarray(leaf, jnp.float32)))
    if not found[MOE_LOSS_KEYS[0]]:
        return {}
    out = {}
    for k, values in found.items():
        stacked = jnp.concatenate(values)
        out[k] = jnp.sum(stacked) if k in MOE_LOSS_KEYS else jnp.mean(stacked)
    return out


def moe_mlp_for_config(cfg, deterministic: bool, name: str = "mlp", **kw) -> MoeMlp:
    """The MoeMlp a TransformerConfig describes (kw: dtype, param_dtype)."""
    return MoeMlp(num_experts=cfg.num_experts, mlp_dim=cfg.mlp_dim, activations=cfg.mlp_activations,
                  top_k=cfg.moe_top_k, impl=cfg.moe_impl, capacity_factor=cfg.moe_capacity_factor, group_size=cfg.moe_group_size,
                  renormalize_top_k=cfg.moe_renormalize_top_k, use_bias=cfg.use_bias,
                  dropout_rate=cfg.dropout_rate, deterministic=deterministic, name=name, **kw)

