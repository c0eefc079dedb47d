"""Pieces of the model-FLOPs formula (DESIGN.md) that families combine in `flops_per_example`.

Training FLOPs per token: 6 x (non-embedding matmul params + unembedding) plus attention,
12 x layers x length x head_dim x heads (halved when causal). MoE counts only the experts a token
is routed to.
"""

from __future__ import annotations

import jax
import numpy as np

from t5x_like.layers.moe import EXPERT_PARAM_RE

EMBEDDING_TABLES = ("token_embed", "position_embed", "type_embed", "relpos_bias")


def matmul_params(tree, config) -> float:
    """Params of every kernel of rank >= 2 (dense layers), outside the embedding tables.

    MoE expert kernels (`mlp/wi*`, `mlp/wo`, see layers/moe.py) count top_k / num_experts of their
    size: a token only visits k experts.
    """
    experts = getattr(config, "num_experts", 0)
    expert_fraction = config.moe_top_k / experts if experts else 1.0
    total = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [getattr(k, "key", str(k)) for k in path]
        if any(k in EMBEDDING_TABLES for k in keys):
            continue
        if keys[-1] == "kernel":
            total += int(np.prod(np.shape(leaf)))
        elif len(keys) >= 2 and keys[-2] == "mlp" and EXPERT_PARAM_RE.fullmatch(keys[-1]) and \
                not keys[-1].endswith("_bias"):
            total += int(np.prod(np.shape(leaf))) * expert_fraction
    return total


def unembedding_params(config) -> int:
    """The tied output projection's size (an untied one is a counted kernel)."""
    return config.vocab_size * config.d_model if config.tie_embeddings else 0


def attention_flops(config, layers: int, q_len: int, k_len: int, causal: bool) -> float:
    per_token = 12 * layers * k_len * config.head_dim * config.num_heads
    return per_token * q_len * (0.5 if causal else 1.0)
