"""Mesh construction, logical-axis rules, global batches and sharded forward passes on 8 fake CPU devices."""

import jax
import numpy as np
import pytest
import flax.linen as nn
from jax.sharding import Mesh, PartitionSpec as P

from t5x_like import partitioning
from t5x_like.models import DecoderOnlyConfig, DecoderOnlyModel, EncoderDecoderConfig, EncoderDecoderModel

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices; see tests/conftest.py")


def test_mesh_fill_and_errors():
    assert partitioning.mesh_shape(num_devices=8) == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}
    assert partitioning.mesh_shape(data=2, fsdp=-1, num_devices=8)["fsdp"] == 4
    with pytest.raises(partitioning.MeshError, match="needs a multiple of 3 devices"):
        partitioning.mesh_shape(data=3, num_devices=8)
    with pytest.raises(partitioning.MeshError, match="at most one may be -1"):
        partitioning.mesh_shape(data=-1, fsdp=-1, num_devices=8)
    with pytest.raises(partitioning.MeshError, match="covers 4 devices"):
        partitioning.mesh_shape(data=2, fsdp=2, num_devices=8)
    mesh = partitioning.create_mesh(data=2, tensor=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4, "expert": 1}


def test_rules_map_params_and_activations_differently():
    rules = partitioning.logical_axis_rules()
    assert nn.logical_to_mesh_axes(("embed", "mlp"), rules) == P("fsdp", "tensor")
    assert nn.logical_to_mesh_axes(("batch", "length", "embed"), rules) == P(("data", "fsdp", "expert"), None, None)
    custom = partitioning.logical_axis_rules(overrides=(("embed", None),))
    assert nn.logical_to_mesh_axes(("embed", "mlp"), custom) == P(None, "tensor")


def test_batch_size_must_divide_data_shards():
    mesh = partitioning.create_mesh(data=4, fsdp=2)
    partitioning.check_batch_size(16, mesh)
    with pytest.raises(partitioning.MeshError, match="not divisible by the 8 data-parallel shards"):
        partitioning.check_batch_size(12, mesh)


def test_global_batch_on_a_single_device_mesh():
    rng = np.random.default_rng(0)
    batch = {"decoder_target_tokens": rng.integers(1, 64, (2, 16), dtype=np.int32),
             "decoder_loss_weights": np.ones((2, 16), np.float32)}
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    global_batch = partitioning.to_global_batch(batch, mesh)
    for key, value in batch.items():
        assert isinstance(global_batch[key], jax.Array)
        np.testing.assert_array_equal(np.asarray(global_batch[key]), value)
    assert partitioning.default_batch_spec(Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "tensor"))) \
        == P(("data",))
    with pytest.raises(ValueError, match="pass partition_spec"):
        partitioning.default_batch_spec(Mesh(np.array(jax.devices()[:1]), ("tensor",)))


def test_global_batch_is_split_over_the_data_axis_of_a_multi_device_mesh():
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
    host = {"decoder_target_tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5)}
    out = partitioning.to_global_batch(host, mesh)["decoder_target_tokens"]
    assert out.shape == (8, 5) and len(out.sharding.device_set) == 4
    shards = sorted((s.index[0].start, s.data.shape) for s in out.addressable_shards)
    assert shards == [(0, (4, 5)), (0, (4, 5)), (4, (4, 5)), (4, (4, 5))], shards
    np.testing.assert_array_equal(np.asarray(out), host["decoder_target_tokens"])


def test_global_batch_has_the_batch_sharding_of_the_train_step():
    mesh = partitioning.create_mesh(data=2, fsdp=2, tensor=2)
    out = partitioning.to_global_batch({"x": np.zeros((8, 3), np.int32)}, mesh)["x"]
    assert out.sharding.is_equivalent_to(partitioning.batch_sharding(mesh, 2), 2)
    assert partitioning.data_parallel_size(mesh) == 4
    assert len({s.index[0].start for s in out.addressable_shards}) == 4


def test_host_rows_of_a_single_process_are_the_whole_batch():
    assert partitioning.host_rows_of(partitioning.create_mesh(data=2, tensor=4), 16) == (0, 16)
    assert partitioning.host_rows_of(partitioning.create_mesh(data=1, fsdp=-1), 8) == (0, 8)


def _sharded_logits(model, variables, batch, mesh):
    rules = partitioning.logical_axis_rules()
    param_sharding = partitioning.logical_to_sharding(model.logical_axes(), mesh, rules)
    variables = jax.device_put(variables, param_sharding)
    batch = {k: jax.device_put(v, partitioning.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}

    with partitioning.activation_context(mesh, rules):
        lowered = jax.jit(model.compute_logits).lower(variables, batch)
        assert "sharding_constraint" in lowered.as_text()  # the models' logical constraints took effect
        return variables, lowered.compile()(variables, batch)


@pytest.mark.parametrize("mesh_kw", [dict(data=8), dict(data=1, fsdp=8), dict(data=2, tensor=4),
                                     dict(data=2, fsdp=2, tensor=2)])
@pytest.mark.parametrize("family", ["decoder", "encdec"])
def test_sharded_forward_matches_single_device(mesh_kw, family):
    common = dict(vocab_size=64, d_model=32, num_heads=4, head_dim=8, mlp_dim=64)
    if family == "decoder":
        model = DecoderOnlyModel(DecoderOnlyConfig(num_layers=2, num_kv_heads=4, position_embedding="rotary",
                                                   mlp_activations=("silu", "linear"), tie_embeddings=False,
                                                   scan_layers=True, **common))
    else:
        model = EncoderDecoderModel(EncoderDecoderConfig(num_encoder_layers=2, num_decoder_layers=2, **common))
    variables = model.init_variables(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {k: rng.integers(1, 64, (8, 12), dtype=np.int32) for k in model.required_features}
    expected = model.compute_logits(variables, batch)

    mesh = partitioning.create_mesh(**mesh_kw)
    placed, logits = _sharded_logits(model, variables, batch, mesh)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=2e-5, atol=2e-5)
    # Params really are split the way the rules say: the mlp kernels over `tensor`, embed over `fsdp`.
    leaf = placed["params"]["decoder"]["layers"]["mlp"]["wi_0"]["kernel"] if family == "decoder" else \
        placed["params"]["decoder"]["layers_0"]["mlp"]["wi"]["kernel"]
    shard = leaf.addressable_shards[0].data.shape
    expected_shard = list(leaf.shape)
    expected_shard[-2] //= mesh.shape["fsdp"]
    expected_shard[-1] //= mesh.shape["tensor"]
    assert list(shard) == expected_shard
