"""Tiny models of every family for the model tests, shared as fixtures (no __init__.py here).

`tiny.config(kind, **overrides)` builds a config, `tiny.params(model)` draws random parameters with
numpy (shapes from `jax.eval_shape`, so nothing is compiled for init), and `tiny.logits(model,
variables, batch)` runs a jitted `compute_logits`, cached per config.
"""

import jax
import numpy as np
import pytest

from t5x_like.interop.hf import stack_layers
from t5x_like.models import (DecoderOnlyConfig, EncoderDecoderConfig, EncoderOnlyConfig,
                             model_for_config)

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, d_model=32, num_heads=4, head_dim=8, mlp_dim=64)


def _config(kind: str, **overrides):
    if kind == "llama":  # RMSNorm, SwiGLU, rotary, grouped-query attention, untied output
        cfg = DecoderOnlyConfig(num_layers=2, position_embedding="rotary", num_kv_heads=2,
                                mlp_activations=("silu", "linear"), tie_embeddings=False, **COMMON)
    elif kind == "gpt2":  # LayerNorm, biases, GELU, learned absolute positions, tied output
        cfg = DecoderOnlyConfig(num_layers=2, position_embedding="learned", max_position_embeddings=32,
                                norm_type="layer", use_bias=True, mlp_activations=("gelu_tanh",), **COMMON)
    elif kind == "t5":  # T5.1.1: relative bias (log buckets reached at these lengths), GeGLU, unscaled scores
        cfg = EncoderDecoderConfig(num_encoder_layers=2, num_decoder_layers=2, position_embedding="relative",
                                   relative_num_buckets=8, relative_max_distance=20,
                                   mlp_activations=("gelu_tanh", "linear"), scale_attention_scores=False,
                                   tie_embeddings=False, **COMMON)
    elif kind == "bert":  # post-norm LayerNorm, biases, learned positions, token types, MLM head
        cfg = EncoderOnlyConfig(num_layers=2, position_embedding="learned", max_position_embeddings=32,
                                norm_type="layer", norm_position="post", use_bias=True,
                                mlp_activations=("gelu",), **COMMON)
    else:
        raise ValueError(kind)
    return cfg.replace(**overrides)


def _random_params(model, seed: int = 0) -> dict:
    """{'params': ...} with every leaf random (biases, norm scales and offsets included).

    Drawn unscanned (layers_0, layers_1, ...) and stacked when the config scans, so a scanned and an
    unscanned model built with the same seed hold the same weights.
    """
    cfg = model.config
    unscanned = model if not cfg.scan_layers else model_for_config(cfg.replace(scan_layers=False))
    shapes = jax.eval_shape(unscanned.init_variables, jax.random.key(0))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            x = 1.0 + 0.2 * rng.standard_normal(s.shape)
        elif name.endswith("['bias']") or name.endswith("['mlm_bias']"):
            x = 0.2 * rng.standard_normal(s.shape)
        elif name.endswith("['kernel']"):
            fan_in = np.prod(s.shape[:2]) if "['out']" in name else s.shape[0]
            x = rng.standard_normal(s.shape) / np.sqrt(fan_in)
        elif "token_embed" in name or "rel_embedding" in name:
            x = rng.standard_normal(s.shape)
        else:  # position and token-type tables
            x = 0.5 * rng.standard_normal(s.shape)
        return np.asarray(x, np.float32)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    if cfg.scan_layers:
        params = stack_layers(params)
    return {"params": params}


class Tiny:
    VOCAB = VOCAB

    def __init__(self):
        self._jitted = {}

    config = staticmethod(_config)

    @staticmethod
    def model(kind_or_config, **overrides):
        cfg = _config(kind_or_config, **overrides) if isinstance(kind_or_config, str) else kind_or_config
        return model_for_config(cfg)

    params = staticmethod(_random_params)

    def logits(self, model, variables, batch) -> np.ndarray:
        """Deterministic float32 logits via a jitted compute_logits (one compile per config and shape)."""
        fn = self._jitted.get(model.config)
        if fn is None:
            fn = self._jitted[model.config] = jax.jit(lambda v, b: model.compute_logits(v, b))
        return np.asarray(fn(variables, {k: np.asarray(v) for k, v in batch.items()}))

    @staticmethod
    def tokens(rng, shape, low: int = 2):
        """Random non-padding ids (0 is padding)."""
        return rng.integers(low, VOCAB, size=shape).astype(np.int32)


@pytest.fixture(scope="session")
def tiny():
    return Tiny()
