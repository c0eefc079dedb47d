"""LoRA adapters (Hu et al. 2021) on any set of `DenseGeneral` kernels, chosen by a regex.

A matched projection y = x . W becomes y = x . W + (alpha / rank) * dropout(x) . A . B, with
A [*in_shape, rank] and B [rank, *features] stored beside the kernel as `lora_a` and `lora_b`
(logical axes: the kernel's input axes + `lora_rank`, and `lora_rank` + its output axes).
Initialisation follows Hugging Face `peft`: A kaiming-uniform(a=sqrt(5)) over the fan-in (or
N(0, std=1/rank) for "gaussian"), B zeros, so a fresh adapter leaves the model unchanged.

Why ours and not qwix's LoRA: qwix intercepts `jax.lax.dot_general` / `jnp.einsum`, but our
`DenseGeneral` contracts a reshaped 2-D kernel with `jnp.matmul` (a 2x faster backward pass on
XLA:CPU, layers/dense.py), so qwix only gave adapters to some kernels. Here the adapter hooks the
module itself through `flax.linen.intercept_methods`: `LoraModule` wraps any network and runs its
`init` / `apply` under `lora_interceptor`, so no layer and no family knows about LoRA, and scanned
layers (`nn.scan`), remat and the KV-cache `decode_step` work unchanged.

Kernel paths are the '/'-joined module path of each `DenseGeneral`, e.g.
`decoder/layers_0/self_attention/query`, `encoder/layers_1/mlp/wi_0`, or with `scan_layers=True`
`decoder/layers/self_attention/query` (one stacked adapter per scanned kernel).

Pure helpers on params trees: `merge` (fold adapters into kernels for serving), `unmerge`,
`split_adapters` / `join` (base weights vs adapter weights).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from t5x_like.errors import UserError
from t5x_like.layers.dense import DenseGeneral, _as_tuple
from t5x_like.layers.quantization import QuantizedArray

LORA_A, LORA_B = "lora_a", "lora_b"
RANK_AXIS = "lora_rank"
# The output projection is read directly by the fused loss (OutputHead), which an adapter would bypass.
OUTPUT_PROJECTION = "logits_dense"
# Parameters a LoRA run trains (re.search over '/'-joined parameter paths).
TRAINABLE_REGEX = r"(^|/)lora_[ab]$"
PRESETS = {
    "attention": r"(^|/)(query|key|value|out)$",
    "mlp": r"(^|/)(wi|wo|wi_0|wi_1)$",
    "all-linear": rf"^(?!(.*/)?{OUTPUT_PROJECTION}$)",
}
INITS = ("kaiming_uniform", "gaussian")


class LoraError(UserError):
    """A LoRA config, target pattern or adapter tree that cannot work; the message names the fix."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, scale alpha / r, dropout on the adapter's input, and which kernels get adapters.

    `targets` is a preset ("attention", "mlp", "all-linear") or a regex searched in each
    DenseGeneral's '/'-joined module path (e.g. `self_attention/(query|value)$`).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "attention"
    init: str = "kaiming_uniform"

    def __post_init__(self):
        def number(x, kinds=(int, float, np.integer, np.floating)):
            return isinstance(x, kinds) and not isinstance(x, bool)
        if not number(self.rank, (int, np.integer)) or self.rank < 1:
            raise LoraError(f"LoraConfig.rank={self.rank!r} must be an integer >= 1 (e.g. 8)")
        if not number(self.alpha) or not self.alpha > 0:
            raise LoraError(f"LoraConfig.alpha={self.alpha!r} must be a number > 0 (e.g. 2 * rank)")
        if not number(self.dropout) or not 0 <= self.dropout < 1:
            raise LoraError(f"LoraConfig.dropout={self.dropout!r} must be in [0, 1) (0 disables it)")
        if self.init not in INITS:
            raise LoraError(f"LoraConfig.init={self.init!r} is not one of {list(INITS)}")
        if not isinstance(self.targets, str) or not self.targets:
            raise LoraError(f"LoraConfig.targets={self.targets!r} must be a preset {sorted(PRESETS)} or a regex")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise LoraError(f"LoraConfig.targets={self.targets!r} is not a regular expression ({e}); use a preset "
                            f"{sorted(PRESETS)} or a regex like 'self_attention/(query|value)$'") from None
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def pattern(self) -> str:
        """The regex `targets` stands for (a preset's regex, or `targets` itself)."""
        return PRESETS.get(self.targets, self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def matches(self, path: str) -> bool:
        return re.search(self.pattern, path) is not None

    def replace(self, **changes) -> "LoraConfig":
        return dataclasses.replace(self, **changes)


def kaiming_uniform_init(fan_in: int) -> Callable:
    """torch's kaiming_uniform_(a=sqrt(5)) on a [rank, fan_in] weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def gaussian_init(rank: int) -> Callable:
    """peft's init_lora_weights="gaussian": N(0, std=1/rank)."""
    def init(key, shape, dtype=jnp.float32):
        return (jax.random.normal(key, shape, jnp.float32) / rank).astype(dtype)
    return init


def _module_path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def _contract(x, w, n: int, trailing: bool, x_axes: tuple[int, ...], dtype):
    """x . w contracting `x_axes` of x with the first n axes of w, float32 accumulation, then `dtype`."""
    w = jnp.asarray(w, dtype)
    if trailing:  # the 2-D matmul DenseGeneral uses (fast backward pass on XLA:CPU)
        lead, fan_in = x.shape[:x.ndim - n], int(np.prod(w.shape[:n]))
        out = jnp.matmul(jnp.reshape(x, (-1, fan_in)), jnp.reshape(w, (fan_in, -1)),
                         preferred_element_type=jnp.float32)
        return jnp.reshape(out, lead + w.shape[n:])
    return lax.dot_general(x, w, ((x_axes, tuple(range(n))), ((), ())), preferred_element_type=jnp.float32)


class _Tracker:
    """Which DenseGeneral paths an init saw and which of them got adapters."""

    def __init__(self):
        self.seen: list[str] = []
        self.matched: list[str] = []

    def add(self, path: str, matched: bool) -> None:
        if path not in self.seen:
            self.seen.append(path)
        if matched and path not in self.matched:
            self.matched.append(path)


def lora_interceptor(config: LoraConfig, tracker: Optional[_Tracker] = None):
    """A `flax.linen.intercept_methods` interceptor adding adapters to matching DenseGeneral calls."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, DenseGeneral):
            return next_fun(*args, **kwargs)
        path = _module_path(module)
        matched = config.matches(path)
        if tracker is not None:
            tracker.add(path, matched)
        if not matched:
            return next_fun(*args, **kwargs)
        if module.path and module.path[-1] == OUTPUT_PROJECTION:
            raise LoraError(f"LoRA targets {config.targets!r} match the output projection {path}, which the fused "
                            "loss reads directly; exclude it (e.g. targets='all-linear')")
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["x"]
        return y + _adapter(module, config, x, path).astype(y.dtype)

    return intercept


def _adapter(module: DenseGeneral, config: LoraConfig, x, path: str):
    """scale * dropout(x) . A . B for this module, creating (init) or reading lora_a / lora_b."""
    features = _as_tuple(module.features)
    axis = tuple(a % x.ndim for a in _as_tuple(module.axis))
    in_shape = tuple(x.shape[a] for a in axis)
    n_in = len(in_shape)
    rank = config.rank
    if not module.is_initializing() and not module.has_variable("params", LORA_A):
        raise LoraError(f"params lack the LoRA adapter of {path} ({LORA_A}, {LORA_B}); initialise them "
                        "(model.init_variables), load them (interop.peft.load_adapters) or add them with lora.join")
    fan_in = int(np.prod(in_shape))
    a_init = kaiming_uniform_init(fan_in) if config.init == "kaiming_uniform" else gaussian_init(rank)
    a = module.param(LORA_A, nn.with_logical_partitioning(a_init, tuple(module.kernel_axes[:n_in]) + (RANK_AXIS,)),
                     in_shape + (rank,), module.param_dtype)
    b = module.param(LORA_B, nn.with_logical_partitioning(nn.initializers.zeros,
                                                          (RANK_AXIS,) + tuple(module.kernel_axes[n_in:])),
                     (rank,) + features, module.param_dtype)
    dtype = module.dtype
    x = jnp.asarray(x, dtype)
    # DenseGeneral has no `deterministic` argument: dropout is on iff a 'dropout' rng is given,
    # which the model's forward pass does only when training with dropout (models/base.py).
    if config.dropout > 0.0 and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - config.dropout, x.shape)
        x = jnp.where(keep, x / jnp.asarray(1.0 - config.dropout, dtype), jnp.zeros((), dtype))
    trailing = axis == tuple(range(x.ndim - n_in, x.ndim))
    h = _contract(x, a, n_in, trailing, axis, dtype).astype(dtype)  # [..., rank]
    out = _contract(h, b, 1, True, (h.ndim - 1,), dtype)  # float32 [..., *features]
    return (out * config.scale).astype(dtype)


class LoraModule:
    """A network with LoRA adapters: `init` / `apply` run the network's under the interceptor.

    Not an `nn.Module`: every other attribute (config, methods, ...) is the wrapped network's.
    `init` raises `LoraError` when the targets match no DenseGeneral.
    """

    def __init__(self, network: nn.Module, lora_config: LoraConfig):
        self.network = network
        self.lora_config = lora_config

    def __getattr__(self, name):
        if name in ("network", "lora_config") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.network, name)

    def __repr__(self):
        return f"LoraModule({self.network!r}, {self.lora_config})"

    def _run(self, fn, *args, tracker=None, **kwargs):
        with nn.intercept_methods(lora_interceptor(self.lora_config, tracker)):
            return fn(*args, **kwargs)

    def _check(self, tracker: _Tracker) -> None:
        if tracker.seen and not tracker.matched:
            cfg = self.lora_config
            shown = f"{cfg.targets!r}" + (f" ({cfg.pattern!r})" if cfg.pattern != cfg.targets else "")
            raise LoraError(f"LoRA targets regex {shown} matches no dense kernel; kernels are named like "
                            f"{', '.join(tracker.seen[:4])} (re.search over these paths; presets: "
                            f"{', '.join(sorted(PRESETS))})")

    def init(self, *args, **kwargs):
        tracker = _Tracker()
        out = self._run(self.network.init, *args, tracker=tracker, **kwargs)
        self._check(tracker)
        return out

    def init_with_output(self, *args, **kwargs):
        tracker = _Tracker()
        out = self._run(self.network.init_with_output, *args, tracker=tracker, **kwargs)
        self._check(tracker)
        return out

    def apply(self, *args, **kwargs):
        return self._run(self.network.apply, *args, **kwargs)

    def adapted_paths(self, *args, **kwargs) -> list[str]:
        """Module paths that get adapters when the network is initialised with these arguments
        (traced with `jax.eval_shape`, nothing allocated)."""
        tracker = _Tracker()
        jax.eval_shape(lambda: self._run(self.network.init, *args, tracker=tracker, **kwargs))
        return list(tracker.matched)


# ------------------------------------------------------------ params-tree helpers


def _is_adapter_key(key) -> bool:
    return key in (LORA_A, LORA_B)


def split_adapters(params) -> tuple[dict, dict]:
    """(base, adapters): the tree without `lora_a` / `lora_b` leaves, and a tree of only those."""
    if not isinstance(params, dict) and not hasattr(params, "items"):
        return params, {}
    base, adapters = {}, {}
    for k, v in params.items():
        if _is_adapter_key(k):
            adapters[k] = v
        elif isinstance(v, dict) or hasattr(v, "items"):
            b, a = split_adapters(v)
            base[k] = b
            if a:
                adapters[k] = a
        else:
            base[k] = v
    return base, adapters


def join(base, adapters) -> dict:
    """`base` with the leaves of `adapters` added (adapter leaves replace any already there)."""
    if not adapters:
        return base
    out = dict(base)
    for k, v in adapters.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            if k not in out:
                raise LoraError(f"adapter subtree {k!r} has no counterpart in the base params (keys: "
                                f"{sorted(out)[:6]}); the adapters belong to another model")
            out[k] = join(out[k], v)
        else:
            out[k] = v
    return out


def _delta(kernel, a, b, scale: float):
    """scale * A . B in the kernel's shape and dtype (leading axes shared: scanned layers)."""
    lead = a.ndim + b.ndim - 2 - kernel.ndim
    n_in, n_out = a.ndim - 1 - lead, b.ndim - 1 - lead
    if lead < 0 or n_in < 1 or n_out < 1 or a.shape[:lead] != b.shape[:lead] or a.shape[-1] != b.shape[lead] \
            or tuple(kernel.shape) != tuple(a.shape[:-1]) + tuple(b.shape[lead + 1:]):
        raise LoraError(f"adapter shapes {tuple(a.shape)} x {tuple(b.shape)} do not fit kernel {tuple(kernel.shape)}")
    lead_shape = tuple(kernel.shape[:lead])
    fan_in, fan_out = int(np.prod(a.shape[lead:-1])), int(np.prod(b.shape[lead + 1:]))
    a2 = jnp.reshape(jnp.asarray(a, jnp.float32), lead_shape + (fan_in, a.shape[-1]))
    b2 = jnp.reshape(jnp.asarray(b, jnp.float32), lead_shape + (b.shape[lead], fan_out))
    d = jnp.matmul(a2, b2, precision=lax.Precision.HIGHEST)
    return jnp.reshape(d * scale, kernel.shape)


def _map_adapted(params, fn: Callable[[Any, Any, Any], Any], path=()):
    """A copy of `params` where each node holding kernel, lora_a and lora_b is replaced by fn(node)."""
    if not (isinstance(params, dict) or hasattr(params, "items")):
        return params
    if LORA_A in params or LORA_B in params:
        if not (LORA_A in params and LORA_B in params and "kernel" in params):
            raise LoraError(f"{'/'.join(path)} holds {sorted(k for k in params if _is_adapter_key(k))} without "
                            f"both {LORA_A} and {LORA_B} beside a kernel")
        if isinstance(params["kernel"], QuantizedArray):
            raise LoraError(f"the kernel of {'/'.join(path)} is stored quantized; merge adapters into float "
                            "kernels (the params before quantize_params, or dequantized)")
        return fn(dict(params), path)
    return {k: _map_adapted(v, fn, path + (k,)) for k, v in params.items()}


def merge(params, lora_config: LoraConfig) -> dict:
    """Fold every adapter into its kernel (kernel + scale * A . B) and drop the lora leaves: params
    for the model without LoRA, same logits as the LoRA model."""
    def fold(node, path):
        a, b = node.pop(LORA_A), node.pop(LORA_B)
        k = node["kernel"]
        node["kernel"] = (jnp.asarray(k, jnp.float32) + _delta(k, a, b, lora_config.scale)).astype(k.dtype)
        return node
    return _map_adapted(params, fold)


def unmerge(merged_params, adapters, lora_config: LoraConfig) -> dict:
    """Inverse of `merge`: subtract scale * A . B from each adapted kernel and put the adapters back."""
    joined = join(merged_params, adapters)

    def unfold(node, path):
        k = node["kernel"]
        node["kernel"] = (jnp.asarray(k, jnp.float32) - _delta(k, node[LORA_A], node[LORA_B],
                                                                lora_config.scale)).astype(k.dtype)
        return node
    return _map_adapted(joined, unfold)
