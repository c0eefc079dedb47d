"""Dropless MoE under meshes: the same train losses on one device, data=8, data2 x expert4 and
with fsdp / tensor splits, with the experts really split and tokens exchanged by all-to-all."""

import functools

import jax
import numpy as np
import optax
import pytest

from mesh_training import host_initial_state, train_on_mesh
from t5x_like import partitioning
from t5x_like.layers.moe_dropless import ExpertShardingError
from t5x_like.models import DecoderOnlyConfig, DecoderOnlyModel

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices; see tests/conftest.py")

CFG = DecoderOnlyConfig(vocab_size=64, d_model=32, num_heads=4, head_dim=8, mlp_dim=32, num_layers=2,
                        num_kv_heads=2, position_embedding="rotary", mlp_activations=("silu", "linear"),
                        tie_embeddings=False, num_experts=4, moe_top_k=2, moe_impl="dropless",
                        moe_aux_loss_weight=0.1, moe_z_loss_weight=0.01)


def _batch(rows=8, length=12, seed=0):
    tokens = np.random.default_rng(seed).integers(2, 64, (rows, length + 1)).astype(np.int32)
    return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:]}


@functools.lru_cache(maxsize=None)
def _initial_state(cfg):
    return host_initial_state(DecoderOnlyModel(cfg), optax.adam(1e-2), _batch())


def _train(mesh_kw, cfg=CFG, num_steps=5):
    """Losses of `num_steps` Adam steps on the mesh (None: one device), the HLO, the last state."""
    history, compiled, state = train_on_mesh(DecoderOnlyModel(cfg), optax.adam(1e-2), *_initial_state(cfg), _batch(),
                                             mesh_kw, num_steps)
    return np.asarray([float(m["loss"]) for m in history]), compiled.as_text(), state


@pytest.fixture(scope="module")
def reference():
    return _train(None)[0]


@pytest.mark.parametrize("mesh_kw", [dict(data=8), pytest.param(dict(data=2, expert=4), marks=pytest.mark.slow),
                                     dict(data=1, fsdp=2, expert=2, tensor=2)])  # the last splits experts too
def test_same_losses_on_every_mesh(reference, mesh_kw):
    losses, hlo, state = _train(mesh_kw)
    assert reference[-1] < reference[0]
    np.testing.assert_allclose(losses, reference, rtol=1e-5, err_msg=str(mesh_kw))
    wo = state.params["decoder"]["layers_0"]["mlp"]["wo"]
    ep = mesh_kw.get("expert", 1)
    assert wo.addressable_shards[0].data.shape[0] == 4 // ep   # experts split over the expert axis
    assert ("all-to-all" in hlo) == (ep > 1)                     # tokens, not one-hot tensors, move


def test_expert_count_the_expert_axis_does_not_divide_is_refused():
    cfg = CFG.replace(num_experts=6)
    model, batch = DecoderOnlyModel(cfg), _batch()
    mesh = partitioning.create_mesh(data=2, expert=4)
    with partitioning.activation_context(mesh), pytest.raises(ExpertShardingError) as err:
        jax.eval_shape(lambda: model.init_variables(jax.random.key(0), batch))
    assert "num_experts=6" in str(err.value) and "\n" not in str(err.value)


TINY_RUN = ["train", "--gin_file=tests/tiny_lm_run.gin", "--gin.TRAIN_STEPS=1",
            "--gin.DecoderOnlyConfig.num_experts=6", "--gin.DecoderOnlyConfig.moe_top_k=2"]


@pytest.mark.slow
def test_train_cli_refuses_an_expert_count_the_expert_axis_does_not_divide(tmp_path, capsys):
    """Through the command line: one `error:` line, exit 2, before any step (no checkpoint)."""
    from t5x_like import main
    status = main.main(TINY_RUN + [f"--gin.MODEL_DIR='{tmp_path}'", "--gin.create_mesh.data=2",
                                   "--gin.create_mesh.expert=4"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: num_experts=6 cannot be split over the 4 expert-parallel shards")
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
