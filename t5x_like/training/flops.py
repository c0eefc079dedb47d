"""Model FLOPs per training step (DESIGN.md formula) and a measured matmul peak, for MFU.

Training FLOPs per token: 6 x (non-embedding matmul params + unembedding) plus attention,
12 x layers x length x head_dim x heads (halved when causal). Encoder-decoders count encoder
tokens against the encoder's params and decoder tokens against the decoder's (plus the logits).
"""

from __future__ import annotations

import re
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

EMBEDDING_TABLES = ("token_embed", "position_embed", "type_embed", "relpos_bias")


def _matmul_params(tree, expert_fraction: float = 1.0) -> float:
    """Params of every kernel of rank >= 2 (dense layers), outside the embedding tables.

    MoE expert kernels (`mlp/wi*`, `mlp/wo` stored without a `kernel` level, see layers/moe.py)
    count `expert_fraction` = top_k / num_experts of their size: a token only visits k experts.
    """
    total = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [getattr(k, "key", str(k)) for k in path]
        if any(k in EMBEDDING_TABLES for k in keys):
            continue
        if keys[-1] == "kernel":
            total += int(np.prod(np.shape(leaf)))
        elif len(keys) >= 2 and keys[-2] == "mlp" and re.fullmatch(r"w[io](_\d+)?", keys[-1]):
            total += int(np.prod(np.shape(leaf))) * expert_fraction
    return total


def _attention_flops(config, layers: int, q_len: int, k_len: int, causal: bool) -> float:
    per_token = 12 * layers * k_len * config.head_dim * config.num_heads
    return per_token * q_len * (0.5 if causal else 1.0)


def train_flops_per_example(model, params, lengths: Mapping[str, int]) -> float:
    """FLOPs of one forward+backward pass over one example row.

    `params`: the 'params' tree (arrays or ShapeDtypeStructs). `lengths`: feature -> row length.
    """
    cfg = model.config
    experts = getattr(cfg, "num_experts", 0)
    _count = (lambda tree: _matmul_params(tree, cfg.moe_top_k / experts)) if experts else _matmul_params
    unembed = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0  # untied: a counted kernel
    if "encoder_input_tokens" in lengths and "decoder_input_tokens" in lengths:
        enc_len, dec_len = lengths["encoder_input_tokens"], lengths["decoder_input_tokens"]
        enc = _count(params["encoder"])
        dec = _count({k: v for k, v in params.items() if k != "encoder"})
        flops = 6 * (enc * enc_len + (dec + unembed) * dec_len)
        flops += _attention_flops(cfg, cfg.num_encoder_layers, enc_len, enc_len, causal=False)
        flops += _attention_flops(cfg, cfg.num_decoder_layers, dec_len, dec_len, causal=True)
        flops += _attention_flops(cfg, cfg.num_decoder_layers, dec_len, enc_len, causal=False)
        return float(flops)
    causal = "decoder_input_tokens" in lengths
    length = lengths["decoder_input_tokens" if causal else "encoder_input_tokens"]
    flops = 6 * (_count(params) + unembed) * length
    return float(flops + _attention_flops(cfg, cfg.num_layers, length, length, causal=causal))


def measure_matmul_peak(dtype=jnp.float32, size: int = 2048, repeats: int = 5, min_seconds: float = 0.0) -> float:
    """FLOP/s of a large square matmul on the default device: the achievable peak MFU is judged by.

    Best of at least `repeats` runs and `min_seconds` of them: on a shared or frequency-scaling
    host a few samples can land in a slow moment and understate the peak (overstating MFU).
    """
    a = jnp.ones((size, size), dtype)
    # Low-precision inputs with a float32 result: the fast path the layers use (layers/dense.py).
    f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best, runs, deadline = float("inf"), 0, time.perf_counter() + min_seconds
    while runs < repeats or time.perf_counter() < deadline:
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
        runs += 1
    # Fake CPU devices share the host's cores, so only accelerators add up.
    devices = 1 if jax.default_backend() == "cpu" else jax.device_count()
    return 2 * size ** 3 / best * devices
