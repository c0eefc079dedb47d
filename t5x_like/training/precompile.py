"""Ahead-of-time compile the train step for a model on a mesh, with nothing allocated.

Why: to learn whether a model fits a slice (and which mesh makes it fit) before paying for the
slice. The mesh is laid over `num_fake_devices` fake CPU devices; the train state and batch are
ShapeDtypeStructs carrying the same NamedShardings a real run uses, so XLA's SPMD partitioner
produces the per-device program a real run would, and its memory analysis gives per-device bytes
of arguments (this device's shard of params, optimizer state and batch), outputs and
temporaries (activations, gradients, collectives' buffers). Also reported: XLA's FLOP count of
one device's program and the analytic bytes of this device's params and optimizer state.

CPU is not the target chip: temporaries depend on the backend's fusion and scheduling, so treat
them as an estimate; argument and output bytes follow from the shardings alone and are exact.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Mapping, Optional

import gin
import jax
import numpy as np

from t5x_like import partitioning
from t5x_like.training import run_checks, steps
from t5x_like.training.train_state import sharded_abstract_state

GiB = 1024 ** 3


def _bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


@gin.configurable(denylist=["model"])
def precompile(model, *, task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
               batch_size: int = gin.REQUIRED, optimizer=gin.REQUIRED,
               mesh_fn: Callable = partitioning.create_mesh, num_microbatches: int = 1,
               loss=None, dropout: bool = False) -> dict:
    """Lower and compile the train step on `mesh_fn()` with abstract inputs; returns the report."""
    run_checks.check_run("precompile", locals())
    mesh = mesh_fn()
    partitioning.check_batch_size(batch_size, mesh)
    shapes = model.batch_shapes(task_feature_lengths, batch_size)
    state, shardings = sharded_abstract_state(model, optimizer, shapes, mesh)
    batch = {k: jax.ShapeDtypeStruct(s, np.int32, sharding=partitioning.batch_sharding(mesh, len(s)))
             for k, s in shapes.items()}
    step = steps.make_train_step(model, optimizer, loss=loss, num_microbatches=num_microbatches,
                                 dropout=dropout, in_shardings=(shardings, None), out_shardings=(shardings, None))
    start = time.perf_counter()
    with partitioning.activation_context(mesh):
        lowered = step.lower(state, batch)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lower_s

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    arg = int(getattr(mem, "argument_size_in_bytes", 0))
    out = int(getattr(mem, "output_size_in_bytes", 0))
    alias = int(getattr(mem, "alias_size_in_bytes", 0))
    temp = int(getattr(mem, "temp_size_in_bytes", 0))
    num_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state.params))
    report = {
        "model": type(model).__name__, "params": int(num_params), "mesh": dict(mesh.shape),
        "devices": int(mesh.size), "batch_size": batch_size, "lengths": dict(task_feature_lengths),
        "num_microbatches": num_microbatches,
        "params_bytes_per_device": _bytes_per_device(state.params),
        "opt_state_bytes_per_device": _bytes_per_device(state.opt_state),
        "argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
        # Donated state is aliased into the outputs: it is not held twice.
        "peak_bytes": arg + out - alias + temp,
        # XLA counts a loop body once, so with scan_layers this undercounts by about the layer count.
        "flops_per_device": float(cost.get("flops", 0.0)),
        "model_flops_per_step": model.flops_per_example(state.params, {k: s[1] for k, s in shapes.items()})
        * batch_size,
        "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1),
    }
    report["param_plus_opt_bytes_per_device"] = report["params_bytes_per_device"] + report["opt_state_bytes_per_device"]
    return report


def format_report(r: Mapping) -> str:
    g = lambda b: f"{b / GiB:.3f} GiB"  # noqa: E731
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
    return "\n".join([
        f"{r['model']} {r['params'] / 1e9:.2f}B params on {r['devices']} devices ({mesh}), "
        f"batch {r['batch_size']} x {r['lengths']}, {r['num_microbatches']} microbatch(es)",
        f"  per device: params {g(r['params_bytes_per_device'])}, optimizer state {g(r['opt_state_bytes_per_device'])}",
        f"  per device (XLA): arguments {g(r['argument_bytes'])}, outputs {g(r['output_bytes'])} "
        f"(aliased {g(r['alias_bytes'])}), temporaries {g(r['temp_bytes'])}, peak ~{g(r['peak_bytes'])}",
        f"  FLOPs per step: XLA {r['flops_per_device']:.3e} per device (x{r['devices']} = "
        f"{r['flops_per_device'] * r['devices']:.3e}; a scanned layer stack counts once), "
        f"model FLOPs {r['model_flops_per_step']:.3e} ({r['model_flops_per_step'] / r['devices']:.3e} per device)",
        f"  lowering {r['lower_s']} s, compile {r['compile_s']} s",
    ])


def set_fake_devices(num_devices: int) -> None:
    """Make the CPU backend expose `num_devices` devices; only works before JAX starts a backend."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", int(num_devices))


def run(gin_files, bindings, output: Optional[str] = None) -> dict:
    """The `precompile` mode: parse gin, fake the devices (NUM_FAKE_DEVICES), compile, print."""
    from t5x_like import gin_config

    gin_config.parse(gin_files, bindings)
    try:
        num = gin.query_parameter("%NUM_FAKE_DEVICES")
    except ValueError:
        num = None
    if num is not None:
        run_checks.check_num_fake_devices(num)
        set_fake_devices(num)
    model = gin_config.model_from_gin()
    report = precompile(model=model)
    print(format_report(report))
    print("REPORT " + json.dumps(report))
    return report
