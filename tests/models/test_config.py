"""Config validation (ConfigError naming the field) and gin binding of config fields."""

import dataclasses

import gin
import pytest

from t5x_like.models import (ConfigError, DecoderOnlyConfig, EncoderDecoderConfig, EncoderOnlyConfig,
                             TransformerConfig)

BAD_VALUES = [
    (dict(num_heads=6, num_kv_heads=4), ("num_heads", "num_kv_heads")),
    (dict(num_heads=8, num_kv_heads=0), ("num_kv_heads",)),
    (dict(position_embedding="alibi"), ("position_embedding",)),
    (dict(mlp_activations=("swish",)), ("mlp_activations",)),
    (dict(mlp_activations=()), ("mlp_activations",)),
    (dict(position_embedding="rotary", head_dim=7), ("head_dim",)),
    (dict(norm_type="batch"), ("norm_type",)),
    (dict(norm_position="sandwich"), ("norm_position",)),
    (dict(remat_policy="everything"), ("remat_policy",)),
    (dict(dtype="float64"), ("dtype",)),
    (dict(param_dtype="int8"), ("param_dtype",)),
    (dict(dropout_rate=1.0), ("dropout_rate",)),
    (dict(sliding_window=0), ("sliding_window",)),
    (dict(d_model=0), ("d_model",)),
    (dict(vocab_size=-1), ("vocab_size",)),
    # Buckets past the exact range need max_distance > num_buckets // 2, or bucket ids go negative.
    (dict(position_embedding="relative", relative_num_buckets=32, relative_max_distance=16),
     ("relative_max_distance",)),
    (dict(position_embedding="relative", relative_num_buckets=2), ("relative_num_buckets",)),
    (dict(position_embedding="learned", max_position_embeddings=0), ("max_position_embeddings",)),
]

FAMILY_BAD_VALUES = [
    (DecoderOnlyConfig, dict(num_layers=0), "num_layers"),
    (EncoderDecoderConfig, dict(num_encoder_layers=-1), "num_encoder_layers"),
    (EncoderDecoderConfig, dict(num_decoder_layers=0), "num_decoder_layers"),
    (EncoderOnlyConfig, dict(num_layers=-2), "num_layers"),
    (EncoderOnlyConfig, dict(mlm_head_activation="gelu_new"), "mlm_head_activation"),
    (EncoderOnlyConfig, dict(type_vocab_size=-1), "type_vocab_size"),
]


@pytest.mark.parametrize("cls", [EncoderDecoderConfig, DecoderOnlyConfig, EncoderOnlyConfig])
@pytest.mark.parametrize("changes,fields", BAD_VALUES, ids=[str(c) for c, _ in BAD_VALUES])
def test_bad_values_raise_config_error_naming_the_field(cls, changes, fields):
    with pytest.raises(ConfigError) as err:
        cls(**changes)
    for field in fields:
        assert field in str(err.value), f"{err.value!r} does not name {field}"
    assert cls.__name__ in str(err.value)
    # replace() on a valid config validates too.
    with pytest.raises(ConfigError):
        cls().replace(**changes)


@pytest.mark.parametrize("cls,changes,field", FAMILY_BAD_VALUES, ids=[f for _, _, f in FAMILY_BAD_VALUES])
def test_family_fields_are_validated(cls, changes, field):
    with pytest.raises(ConfigError, match=field):
        cls(**changes)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_valid_edge_values_are_accepted():
    """The checks must not reject what they should allow."""
    cfg = DecoderOnlyConfig(num_heads=8, num_kv_heads=1, position_embedding="rotary", head_dim=6,
                            mlp_activations=["silu", "linear"], sliding_window=1, dropout_rate=0.0)
    assert cfg.kv_heads == 1 and cfg.mlp_activations == ("silu", "linear")  # lists become tuples
    assert DecoderOnlyConfig(num_heads=8).kv_heads == 8
    assert EncoderDecoderConfig(position_embedding="relative", head_dim=7).head_dim == 7  # odd ok without rotary
    # Bucket settings only matter for relative positions; the smallest valid ones pass.
    assert DecoderOnlyConfig(position_embedding="rotary", relative_max_distance=1).relative_max_distance == 1
    assert EncoderDecoderConfig(relative_num_buckets=4, relative_max_distance=3).relative_max_distance == 3
    assert EncoderOnlyConfig(type_vocab_size=0, mlm_head_activation="relu").type_vocab_size == 0


def test_configs_are_frozen_and_hashable():
    """Flax modules hold configs as attributes, which requires hashing; replace() builds a new one."""
    cfg = DecoderOnlyConfig(num_layers=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_layers = 3
    assert hash(cfg) == hash(DecoderOnlyConfig(num_layers=2)) and cfg == DecoderOnlyConfig(num_layers=2)
    other = cfg.replace(num_layers=3)
    assert other.num_layers == 3 and cfg.num_layers == 2 and type(other) is DecoderOnlyConfig
    assert isinstance(other, TransformerConfig)


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_gin_binds_config_fields(clean_gin):
    gin.parse_config("""
        DecoderOnlyConfig.num_layers = 3
        DecoderOnlyConfig.mlp_activations = ('silu', 'linear')
        EncoderDecoderConfig.num_decoder_layers = 5
        EncoderOnlyConfig.type_vocab_size = 0
    """)
    cfg = DecoderOnlyConfig()
    assert cfg.num_layers == 3 and cfg.mlp_activations == ("silu", "linear")
    assert DecoderOnlyConfig(num_layers=4).num_layers == 4  # explicit arguments win
    assert EncoderDecoderConfig().num_decoder_layers == 5
    assert EncoderOnlyConfig().type_vocab_size == 0
    gin.clear_config()
    assert DecoderOnlyConfig().num_layers == 8


def test_gin_binding_is_validated(clean_gin):
    gin.parse_config("DecoderOnlyConfig.position_embedding = 'alibi'")
    with pytest.raises(ConfigError, match="position_embedding"):
        DecoderOnlyConfig()
