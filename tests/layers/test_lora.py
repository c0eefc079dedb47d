"""LoRA adapters (layers/lora.py): which kernels get them, their shapes and axes, that a zero B is the
base model, merge / unmerge, scanned layers and the KV-cache decode path. Tiny models, float32."""

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from t5x_like.errors import UserError, user_message
from t5x_like.interop.converter import stack_layers
from t5x_like.layers import lora
from t5x_like.layers.dense import DenseGeneral
from t5x_like.layers.lora import LoraConfig, LoraModule
from t5x_like.models import DecoderOnlyConfig, DecoderOnlyModel, EncoderDecoderConfig, EncoderDecoderModel
from t5x_like.partitioning import DEFAULT_RULES

LLAMA = DecoderOnlyConfig(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48,
                          num_layers=2, position_embedding="rotary", mlp_activations=("silu", "linear"),
                          tie_embeddings=False, max_position_embeddings=32)
LENGTH = 8


def _ids(batch=2, length=LENGTH, seed=0):
    return np.random.default_rng(seed).integers(1, 64, (batch, length)).astype(np.int32)


def _randomize_adapters(params, seed=1, scale=0.1):
    """Every lora leaf random (B too, so adapters change the output)."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: (scale * rng.standard_normal(v.shape)).astype(np.float32)
                                         if k[-1] in ("lora_a", "lora_b") else v for k, v in flat.items()})


_JITTED = {}


def _logits(model, params, ids):
    """Logits of a jitted compute_logits, compiled once per model (the suite's main cost)."""
    fn = _JITTED.setdefault(id(model), (model, jax.jit(model.compute_logits)))[1]
    return np.asarray(fn({"params": params}, {"decoder_input_tokens": ids}))


def _random_params(model, seed=0):
    """Random params with numpy (shapes from eval_shape: nothing compiled), adapters included."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(model.param_shapes())
    return traverse_util.unflatten_dict({k: (1.0 + 0.1 * rng.standard_normal(s.shape) if k[-1] == "scale" else
                                             0.2 * rng.standard_normal(s.shape)).astype(np.float32)
                                         for k, s in flat.items()})


class Net(nn.Module):
    """One DenseGeneral, contracting trailing axes or not."""
    axis: int = -1
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        return DenseGeneral((3, 5), ("embed", "heads", "kv"), axis=self.axis, dtype=self.dtype, name="proj")(x)


@pytest.fixture(scope="module")
def llama():
    """(base model, LoRA model on attention + MLP, LoRA params with random adapters, LoRA logits)."""
    model = DecoderOnlyModel(LLAMA, lora=LoraConfig(rank=4, alpha=8.0, targets="all-linear"))
    params = _random_params(model)
    return DecoderOnlyModel(LLAMA), model, params, _logits(model, params, _ids())


def test_adapters_only_on_matched_kernels_with_shapes_and_axes():
    model = DecoderOnlyModel(LLAMA, lora=LoraConfig(rank=3, targets=r"self_attention/(query|out)$"))
    shapes = traverse_util.flatten_dict(model.param_shapes())
    adapted = sorted("/".join(k) for k in shapes if k[-1].startswith("lora"))
    assert adapted == [f"decoder/layers_{i}/self_attention/{m}/lora_{x}" for i in (0, 1) for m in ("out", "query")
                       for x in "ab"]
    q = ("decoder", "layers_0", "self_attention", "query")
    o = ("decoder", "layers_0", "self_attention", "out")
    assert shapes[q + ("lora_a",)].shape == (32, 3) and shapes[q + ("lora_b",)].shape == (3, 4, 8)
    assert shapes[o + ("lora_a",)].shape == (4, 8, 3) and shapes[o + ("lora_b",)].shape == (3, 32)
    axes = traverse_util.flatten_dict(model.logical_axes()["params"])
    assert tuple(axes[q + ("lora_a",)]) == ("embed", "lora_rank")
    assert tuple(axes[q + ("lora_b",)]) == ("lora_rank", "heads", "kv")
    assert tuple(axes[o + ("lora_a",)]) == ("heads", "kv", "lora_rank")
    assert tuple(axes[o + ("lora_b",)]) == ("lora_rank", "embed")
    assert ("lora_rank", None) in DEFAULT_RULES
    assert model.trainable_params_regex() == lora.TRAINABLE_REGEX
    assert DecoderOnlyModel(LLAMA).trainable_params_regex() is None


def test_presets_and_init():
    mlp = DecoderOnlyModel(LLAMA, lora=LoraConfig(rank=2, targets="mlp")).param_shapes()
    assert set(mlp["decoder"]["layers_0"]["mlp"]["wi_0"]) == {"kernel", "lora_a", "lora_b"}
    assert "lora_a" not in mlp["decoder"]["layers_0"]["self_attention"]["query"]
    attention = DecoderOnlyModel(LLAMA, lora=LoraConfig(targets="attention")).param_shapes()
    assert set(attention["decoder"]["layers_1"]["self_attention"]["value"]) == {"kernel", "lora_a", "lora_b"}
    assert "lora_a" not in attention["decoder"]["layers_1"]["mlp"]["wi_1"]
    assert "lora_a" not in attention["logits_dense"]

    x = np.ones((2, 64, 48), np.float32)
    a_b = nn.unbox(LoraModule(Net(), LoraConfig(rank=16, targets="proj")).init(jax.random.key(0), x))["params"]["proj"]
    a = np.asarray(a_b["lora_a"])  # peft: kaiming-uniform(a=sqrt(5)) over fan-in 48 = U(-1/sqrt(48), 1/sqrt(48))
    assert a.shape == (48, 16) and np.all(np.abs(a) <= 48 ** -0.5) and abs(np.std(a) - 48 ** -0.5 / np.sqrt(3)) < 0.01
    assert a_b["lora_b"].shape == (16, 3, 5) and not np.any(np.asarray(a_b["lora_b"]))
    gauss = nn.unbox(LoraModule(Net(), LoraConfig(rank=16, targets="proj", init="gaussian")).init(
        jax.random.key(0), x))["params"]["proj"]["lora_a"]
    assert abs(np.std(np.asarray(gauss)) - 1 / 16) < 0.01  # peft's "gaussian": std 1/r


def test_zero_b_is_the_base_model(llama):
    base, model, params, lora_logits = llama
    ids = _ids()
    zero_b = traverse_util.unflatten_dict({k: np.zeros_like(v) if k[-1] == "lora_b" else v
                                           for k, v in traverse_util.flatten_dict(params).items()})
    base_params, _ = lora.split_adapters(params)
    base_logits = _logits(base, base_params, ids)
    np.testing.assert_array_equal(_logits(model, zero_b, ids), base_logits)
    assert not np.allclose(lora_logits, base_logits, atol=1e-3)


def test_merge_unmerge_and_merged_logits(llama):
    base, model, params, lora_logits = llama
    merged = lora.merge(params, model.lora)
    assert not any(k[-1].startswith("lora") for k in traverse_util.flatten_dict(merged))
    np.testing.assert_allclose(_logits(base, merged, _ids()), lora_logits, atol=1e-5, rtol=0)
    base_params, adapters = lora.split_adapters(params)
    restored = lora.unmerge(merged, adapters, model.lora)
    flat, want = traverse_util.flatten_dict(restored), traverse_util.flatten_dict(params)
    assert set(flat) == set(want)
    for k in want:
        np.testing.assert_allclose(flat[k], want[k], atol=1e-6, rtol=0, err_msg="/".join(k))
    assert traverse_util.flatten_dict(lora.join(base_params, adapters)).keys() == want.keys()


def test_no_match_and_bad_fields_are_one_line_user_errors():
    with pytest.raises(UserError) as e:
        DecoderOnlyModel(LLAMA, lora=LoraConfig(targets="xyz")).param_shapes()
    msg = str(e.value)
    assert "'xyz' matches no dense kernel" in msg and "decoder/layers_0/self_attention/query" in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match="logits_dense"):
        DecoderOnlyModel(LLAMA, lora=LoraConfig(targets="logits")).param_shapes()
    for field, value in (("rank", 0), ("alpha", 0.0), ("dropout", 1.0), ("init", "zeros"), ("targets", "(")):
        with pytest.raises(UserError, match=f"LoraConfig.{field}") as e:
            LoraConfig(**{field: value})
        assert "\n" not in user_message(e.value)


def test_scan_layers_matches_unscanned(llama):
    _, model, params, lora_logits = llama
    scanned = DecoderOnlyModel(LLAMA.replace(scan_layers=True), lora=model.lora)
    stacked = stack_layers(jax.tree_util.tree_map(np.asarray, params))
    assert stacked["decoder"]["layers"]["self_attention"]["query"]["lora_a"].shape == (2, 32, 4)
    np.testing.assert_allclose(_logits(scanned, stacked, _ids()), lora_logits, atol=1e-5, rtol=0)
    merged = jax.tree_util.tree_map(np.asarray, lora.merge(stacked, model.lora))  # stacked adapters merge per layer
    unmerged_then_stacked = stack_layers(jax.tree_util.tree_map(np.asarray, lora.merge(params, model.lora)))
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(unmerged_then_stacked)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_gin_binds_the_model_lora():
    gin.parse_config("DecoderOnlyModel.lora = @LoraConfig()\nLoraConfig.rank = 2\nLoraConfig.targets = 'mlp'")
    model = DecoderOnlyModel(LLAMA)
    assert model.lora == LoraConfig(rank=2, targets="mlp") and isinstance(model.module, LoraModule)
    assert model.module.config is LLAMA  # other attributes are the wrapped network's


def test_decode_through_the_kv_cache_with_lora(llama):
    _, model, params, lora_logits = llama
    ids = _ids()
    cache = model.init_cache(None, 2, LENGTH)
    step = jax.jit(model.decode_step, static_argnums=5)
    for t in range(LENGTH):
        positions = np.full((2, 1), t, np.int32)
        logits, cache = step(params, cache, None, ids[:, t:t + 1], positions, LENGTH)
        np.testing.assert_allclose(np.asarray(logits), lora_logits[:, t], atol=1e-5, rtol=0)


def test_dropout_only_with_a_dropout_rng():
    x = np.random.default_rng(0).standard_normal((2, 6, 4)).astype(np.float32)
    net = LoraModule(Net(), LoraConfig(rank=2, dropout=0.5, targets="proj"))
    variables = {"params": _randomize_adapters(nn.unbox(jax.jit(net.init)(jax.random.key(0), x))["params"], scale=0.5)}
    apply = jax.jit(lambda v, x, rng=None: net.apply(v, x, rngs=None if rng is None else {"dropout": rng}))
    plain = apply(variables, x)
    np.testing.assert_allclose(plain, Net().apply({"params": lora.merge(variables["params"], net.lora_config)}, x),
                               atol=1e-5)  # no rng: no dropout
    dropped = apply(variables, x, jax.random.key(1))
    assert not np.allclose(plain, dropped)


def test_encoder_decoder_and_non_trailing_axes():
    cfg = EncoderDecoderConfig(vocab_size=64, d_model=32, num_heads=4, head_dim=8, mlp_dim=48, num_encoder_layers=1,
                               num_decoder_layers=1, relative_num_buckets=8, relative_max_distance=16)
    shapes = EncoderDecoderModel(cfg, lora=LoraConfig(rank=2, targets="all-linear")).param_shapes()
    assert shapes["decoder"]["layers_0"]["cross_attention"]["key"]["lora_b"].shape == (2, 4, 8)
    assert shapes["encoder"]["layers_0"]["mlp"]["wi"]["lora_a"].shape == (32, 2)

    # Contracting a leading axis takes DenseGeneral's dot_general path; check it against a merge.
    x = np.random.default_rng(0).standard_normal((2, 6, 4)).astype(np.float32)
    conf = LoraConfig(rank=2, targets="proj")
    net = LoraModule(Net(axis=1), conf)
    params = _randomize_adapters(nn.unbox(net.init(jax.random.key(0), x))["params"], scale=0.5)
    assert params["proj"]["lora_a"].shape == (6, 2)
    merged = lora.merge(params, conf)
    np.testing.assert_allclose(net.apply({"params": params}, x), Net(axis=1).apply({"params": merged}, x), atol=1e-5)
    assert net.adapted_paths(jax.random.key(0), x) == ["proj"]
    with pytest.raises(UserError, match="lack the LoRA adapter of proj"):
        net.apply({"params": merged}, x)


def test_bfloat16_compute():
    x = np.random.default_rng(0).standard_normal((2, 6, 4)).astype(np.float32)
    conf = LoraConfig(rank=2, targets="proj")
    net = LoraModule(Net(dtype="bfloat16"), conf)
    params = _randomize_adapters(nn.unbox(net.init(jax.random.key(0), x))["params"], scale=0.5)
    out = net.apply({"params": params}, x)
    assert out.dtype == jnp.bfloat16 and params["proj"]["lora_a"].dtype == np.float32
    ref = Net().apply({"params": lora.merge(params, conf)}, x)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05, rtol=0.05)
