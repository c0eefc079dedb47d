"""Device mesh, logical-axis rules and shardings: the only place that names mesh axes.

Models name logical axes (`batch`, `embed`, `heads`, ...); the rules here map them onto the mesh
axes `data`, `fsdp`, `tensor` and `expert`, so one model runs on any mesh. Params and optimizer
state get `NamedSharding`s from those rules and `jax.jit` (pjit) does the rest.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from t5x_like.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor", "expert")
# Axes the batch is split over: every axis that does not split a parameter's compute (as in MaxText).
BATCH_MESH_AXES = ("data", "fsdp", "expert")

# Order matters: a mesh axis already used by an earlier logical axis of the same array is skipped,
# so activations [batch, length, embed] put fsdp on batch, while params [embed, mlp] put it on embed.
DEFAULT_RULES = (
    ("batch", BATCH_MESH_AXES),
    # MoE expert inputs [expert, expert_group, capacity, embed]: groups (batch rows) split over
    # the data axes only, since `expert` then splits the experts (layers/moe.py);
    # before `embed`, which must not take fsdp from them.
    ("expert_group", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("expert", "expert"),
    ("layers", None),
    ("relpos_buckets", None),
    ("abspos_buckets", None),
    ("token_types", None),
    ("lora_rank", None),  # LoRA adapters' rank axis (layers/lora.py): small, replicated
    ("classes", None),  # a classifier's output classes (models/encoder_classifier.py): few, replicated
    ("reward", None),  # a reward model's scalar output (models/reward_model.py): replicated
)
# Optimizer state only: mesh axes a state leaf also splits over when its logical axes leave them
# unused (`spread_state_sharding`).
STATE_SPREAD_AXES = ("fsdp",)


class MeshError(UserError):
    """A mesh shape that cannot be laid over the available devices."""


@gin.configurable
def logical_axis_rules(overrides: Sequence[tuple[str, Optional[str | tuple[str, ...]]]] = ()):
    """DEFAULT_RULES with `overrides` (same format) taking precedence for the names they give."""
    names = {name for name, _ in overrides}
    return tuple(overrides) + tuple(r for r in DEFAULT_RULES if r[0] not in names)


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1, expert: int = 1,
               num_devices: Optional[int] = None) -> dict[str, int]:
    """Sizes of the mesh axes; one axis may be -1 to take all devices the others leave."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}
    fill = [k for k, v in sizes.items() if v == -1]
    bad = [k for k, v in sizes.items() if v == 0 or v < -1]
    if bad or len(fill) > 1:
        raise MeshError(f"mesh sizes {sizes}: each must be positive, and at most one may be -1 (fill)")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if num_devices % fixed:
        raise MeshError(f"mesh {sizes} needs a multiple of {fixed} devices but there are {num_devices}; "
                        "choose sizes whose product divides the device count")
    if fill:
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(f"mesh {sizes} covers {math.prod(sizes.values())} devices but there are {num_devices}; "
                        "set one axis to -1 or make the product equal the device count")
    return sizes


@gin.configurable
def create_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, expert: int = 1, devices=None) -> Mesh:
    """A Mesh over all (or the given) devices with axes MESH_AXES.

    Uses `jax.make_mesh` for real topologies (it orders devices for fast links); explicit device
    lists (tests) are reshaped in order.
    """
    devices = jax.devices() if devices is None else list(devices)
    sizes = mesh_shape(data, fsdp, tensor, expert, num_devices=len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes: XLA propagates shardings from the jit in/out shardings and our logical
    # constraints (the pjit model), rather than sharding-in-types.
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == jax.device_count():
        try:
            return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
        except (TypeError, ValueError):
            pass
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def activation_context(mesh: Mesh, rules=None):
    """Context under which the models' logical activation constraints bind to `mesh`.

    Use around tracing/calling a jitted step: `with activation_context(mesh): step(...)`.
    """
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(logical_axis_rules() if rules is None else rules))
    return stack


def logical_to_sharding(logical_specs, mesh: Mesh, rules=None):
    """A tree of logical PartitionSpecs -> a tree of NamedShardings on `mesh`."""
    rules = logical_axis_rules() if rules is None else rules
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def _entry_axes(entry) -> tuple:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def spread_state_sharding(sharding: NamedSharding, shape) -> NamedSharding:
    """An optimizer-state leaf's sharding with each axis of STATE_SPREAD_AXES it leaves unused
    added to the dimension with the largest shard that axis divides (unchanged if none does).

    Why: Adafactor's factored moments (`training/adafactor.py`) reduce the parameter's `embed`
    axis, the one fsdp splits, so their kept axes (mlp, heads x kv: tensor axes) would sit whole
    on every chip of an fsdp-only mesh. A sharding changes where the jitted update runs, not what
    it computes (ZeRO-style, like MaxText's `shard_optimizer_over_data` with its data axis).
    """
    mesh, shape = sharding.mesh, tuple(shape)
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for axis in STATE_SPREAD_AXES:
        size = dict(mesh.shape).get(axis, 1)
        if size == 1 or any(axis in _entry_axes(e) for e in spec):
            continue
        shards = [n // math.prod(mesh.shape[a] for a in _entry_axes(e)) for n, e in zip(shape, spec)]
        fits = [d for d, s in enumerate(shards) if s % size == 0 and s > 1]
        if fits:
            d = max(fits, key=lambda i: shards[i])
            spec[d] = _entry_axes(spec[d]) + (axis,)
    return NamedSharding(mesh, P(*spec))


def spread_state_shardings(shardings, shapes):
    """`spread_state_sharding` over a tree of NamedShardings and the matching tree of arrays /
    ShapeDtypeStructs (an optimizer state)."""
    return jax.tree_util.tree_map(lambda s, x: spread_state_sharding(s, np.shape(x)), shardings, shapes)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays [batch, ...]: leading axis over the data-like mesh axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_MESH_AXES, *([None] * (ndim - 1))))


def default_batch_spec(mesh: Mesh) -> P:
    """Batch dimension split over those of the data-parallel axes (BATCH_MESH_AXES) that `mesh` has."""
    axes = tuple(a for a in BATCH_MESH_AXES if a in mesh.axis_names)
    if not axes:
        raise MeshError(f"mesh axes {mesh.axis_names} include none of {BATCH_MESH_AXES} to split the batch "
                        "over; pass partition_spec")
    return P(axes)


def to_global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh,
                    partition_spec: Optional[P] = None) -> dict[str, jax.Array]:
    """Each host passes its own rows; the result is one global array per feature, with
    process_count * host rows, sharded over the mesh (no host sees the others' data)."""
    spec = partition_spec if partition_spec is not None else default_batch_spec(mesh)
    sharding = NamedSharding(mesh, spec)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in host_batch.items()}


def host_rows_of(mesh: Mesh, global_batch_size: int, partition_spec: Optional[P] = None) -> tuple[int, int]:
    """The rows of the global batch this process' devices hold: the slice `to_global_batch`
    expects from this host (`get_iterator(host_rows=...)`). Raises if they are not one contiguous
    block (an unusual mesh)."""
    spec = partition_spec if partition_spec is not None else default_batch_spec(mesh)
    index_map = NamedSharding(mesh, spec).addressable_devices_indices_map((global_batch_size,))
    starts = sorted({(idx[0].start or 0, global_batch_size if idx[0].stop is None else idx[0].stop)
                     for idx in index_map.values()})
    for (_, a_stop), (b_start, _) in zip(starts, starts[1:]):
        if a_stop != b_start:
            raise ValueError(f"this host's devices hold non-contiguous batch rows {starts} on mesh "
                             f"{dict(mesh.shape)}; read per-host shards instead")
    return starts[0][0], starts[-1][1]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the global batch is split; the batch size must be a multiple of it."""
    return math.prod(mesh.shape[a] for a in BATCH_MESH_AXES)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    n = data_parallel_size(mesh)
    if global_batch_size % n:
        raise MeshError(f"batch size {global_batch_size} is not divisible by the {n} data-parallel shards "
                        f"of mesh {dict(mesh.shape)}; use a multiple of {n}")
