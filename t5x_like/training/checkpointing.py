"""Orbax checkpoints of model variables.

Layout: `<directory>/<step>/params`, managed by `ocp.CheckpointManager`, so that training (which
adds optimizer state and iterator position as further items) and imports share one format.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be restored; the message says which and why."""


def save_params(directory: str, step: int, params) -> str:
    """Save `params` as checkpoint `step` under `directory`; returns the step folder."""
    directory = os.path.abspath(os.fspath(directory))
    with ocp.CheckpointManager(directory, item_names=("params",)) as manager:
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        manager.wait_until_finished()
    return os.path.join(directory, str(step))


def restore_params(directory: str, step: Optional[int] = None, target=None):
    """Params of checkpoint `step` (default: latest); `target` (arrays or ShapeDtypeStructs) fixes
    shapes, dtypes and shardings, otherwise they come back as saved, on the default device."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint directory {directory}; pass the folder that holds step folders")
    with ocp.CheckpointManager(directory, item_names=("params",),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise CheckpointError(f"no checkpoint step {step} in {directory}; found {manager.all_steps()}")
        if target is not None:
            target = jax.tree_util.tree_map(
                lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                target)
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    return restored["params"]
