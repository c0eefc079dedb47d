"""Training steps of one initial state on any mesh, for the tests that compare losses across meshes
(tests/layers/test_moe_expert_parallel.py, tests/training/test_moe_training.py). Importable from
any test folder: pytest puts tests/ (conftest.py's folder) on sys.path."""

import jax
import numpy as np

from t5x_like import partitioning
from t5x_like.training import steps
from t5x_like.training.train_state import TrainState, train_state_logical_axes


def host_initial_state(model, optimizer, batch):
    """(the initial state as host arrays, its abstract form): one init for every mesh."""
    state = TrainState.create(model, optimizer, jax.random.key(0), batch)
    return jax.tree_util.tree_map(np.asarray, state), TrainState.abstract(model, optimizer, batch)


def train_on_mesh(model, optimizer, initial, abstract, batch, mesh_kw, num_steps):
    """(metrics of each step, the compiled step, the last state) of `num_steps` train steps from
    `initial` on a mesh of `mesh_kw` axes (None: one device), params sharded by their logical axes."""
    mesh = partitioning.create_mesh(**(mesh_kw or {}), devices=jax.devices()[:1] if mesh_kw is None else None)
    with partitioning.activation_context(mesh):
        shardings = partitioning.logical_to_sharding(train_state_logical_axes(model, abstract, batch), mesh)
        state = jax.device_put(initial, shardings)
        placed = {k: jax.device_put(v, partitioning.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
        step = jax.jit(lambda s, b: steps.train_step(model, optimizer, s, b, dropout=False),
                       in_shardings=(shardings, None), out_shardings=(shardings, None))
        compiled = step.lower(state, placed).compile()
        history = []
        for _ in range(num_steps):
            state, metrics = compiled(state, placed)
            history.append(metrics)
    return history, compiled, state
