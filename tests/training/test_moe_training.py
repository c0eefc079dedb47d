"""MoE in training: router losses in the objective, metrics, and mesh-independent losses on 8 devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mesh_training import host_initial_state, train_on_mesh
from t5x_like.models import DecoderOnlyConfig, DecoderOnlyModel
from t5x_like.training import steps
from t5x_like.objectives import cross_entropy_sums
from t5x_like.training.train_state import TrainState
from t5x_like.training.trainer import _step_scalars

CFG = DecoderOnlyConfig(vocab_size=64, d_model=32, num_heads=4, head_dim=8, mlp_dim=32, num_layers=2,
                        num_kv_heads=2, position_embedding="rotary", mlp_activations=("silu", "linear"),
                        tie_embeddings=False, num_experts=4, moe_every_n_layers=2, moe_top_k=2,
                        moe_capacity_factor=1.0, moe_aux_loss_weight=0.1, moe_z_loss_weight=0.01)


def _batch(rows=8, length=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, 64, (rows, length + 1)).astype(np.int32)
    return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:]}


def test_router_losses_enter_the_loss_but_not_the_nll():
    model = DecoderOnlyModel(CFG)
    batch = _batch()
    state = TrainState.create(model, optax.sgd(0.0), jax.random.key(0), batch)
    _, metrics = jax.jit(lambda s, b: steps.train_step(model, optax.sgd(0.0), s, b, dropout=False))(state, batch)
    logits, aux = jax.jit(model.compute_logits_and_aux)({"params": state.params}, batch)
    sums = cross_entropy_sums(logits, jnp.asarray(batch["decoder_target_tokens"]))
    expected = sums["loss"] / sums["tokens"] + 0.1 * aux["moe_aux_loss"] + 0.01 * aux["moe_z_loss"]
    np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["nll_sum"]), float(sums["nll_sum"]), rtol=1e-5)
    for k in ("moe_aux_loss", "moe_z_loss", "moe_dropped_fraction", "moe_expert_usage_max"):
        # Sums like every other loss term: the per-batch value weighted by the batch's tokens.
        np.testing.assert_allclose(float(metrics[k] / metrics["tokens"]), float(aux[k]), rtol=1e-5)
    # The trainer logs every sum as a per-token mean over its window.
    window = [jax.device_get(metrics)] * 2
    scalars = _step_scalars(window, seconds=1.0, flops_per_step=0.0, peak=0.0)
    assert scalars["moe_dropped_fraction"] == pytest.approx(float(aux["moe_dropped_fraction"]), rel=1e-5)
    assert "is_finite" not in scalars


@pytest.mark.slow
def test_microbatches_match_one_batch():
    """Routing groups are batch rows, so splitting the batch changes neither routing nor losses."""
    model = DecoderOnlyModel(CFG)
    batch = _batch()
    state = TrainState.create(model, optax.sgd(0.1), jax.random.key(0), batch)
    run = lambda k: jax.jit(lambda s, b: steps.train_step(  # noqa: E731
        model, optax.sgd(0.1), s, b, dropout=False, num_microbatches=k))(state, batch)
    (one, m1), (two, m2) = run(1), run(2)
    for k in ("loss", "moe_aux_loss", "moe_dropped_fraction"):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), one.params, two.params)


@functools.lru_cache(maxsize=1)
def _initial_state():
    """One host copy of the initial state for every mesh (one init compile instead of three)."""
    return host_initial_state(DecoderOnlyModel(CFG), optax.adam(1e-2), _batch())


def _losses_on_mesh(mesh_kw, num_steps=20):
    history, _, state = train_on_mesh(DecoderOnlyModel(CFG), optax.adam(1e-2), *_initial_state(), _batch(),
                                      mesh_kw, num_steps)
    wo = state.params["decoder"]["layers_1"]["mlp"]["wo"]
    return (np.asarray([float(m["loss"]) for m in history]),
            np.asarray([float(m["moe_dropped_fraction"]) for m in history]), wo)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices; see tests/conftest.py")
def test_same_losses_on_one_device_data8_and_data2_expert4():
    ref, ref_dropped, _ = _losses_on_mesh(None)
    assert ref[-1] < ref[0]
    for mesh_kw in (dict(data=8), dict(data=2, expert=4)):
        losses, dropped, wo = _losses_on_mesh(mesh_kw)
        np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=str(mesh_kw))
        np.testing.assert_allclose(dropped, ref_dropped, atol=1e-6, err_msg=str(mesh_kw))
        if "expert" in mesh_kw:  # experts really are split: each device holds one of the four
            assert wo.addressable_shards[0].data.shape[0] == 1
