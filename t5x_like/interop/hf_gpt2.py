"""Hugging Face converter: GPT-2 (learned positions, pre-LayerNorm, biases everywhere).

GPT-2 uses `Conv1D` layers whose weights are already [in, out], and one fused `c_attn` projection
whose output columns are query, key, value in that order, each laid out as [heads, head_dim].
"""

from __future__ import annotations

import numpy as np

from t5x_like.interop.converter import Converter, HFInteropError, WeightReader, register
from t5x_like.models.config import DecoderOnlyConfig

HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                  "relu": "relu", "silu": "silu", "swish": "silu"}
TO_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def config_from_hf(cfg: dict) -> DecoderOnlyConfig:
    """Dropout is a training choice, not part of the weights: pass `dropout_rate=` to `hf.load`.

    `reorder_and_upcast_attn` only changes rounding in half precision (scores are float32 here
    anyway), so it is accepted; the other switches change the function and are refused.
    """
    if cfg.get("scale_attn_by_inverse_layer_idx"):
        raise HFInteropError("gpt2 config.json: scale_attn_by_inverse_layer_idx=true is not supported")
    if cfg.get("add_cross_attention"):
        raise HFInteropError("gpt2 config.json: add_cross_attention=true is not supported (decoder-only only)")
    act = cfg.get("activation_function", "gelu_new")
    if act not in HF_ACTIVATIONS:
        raise HFInteropError(f"gpt2 config.json: activation_function={act!r} is not supported; "
                             f"use one of {sorted(HF_ACTIVATIONS)}")
    d, heads = cfg["n_embd"], cfg["n_head"]
    return DecoderOnlyConfig(
        vocab_size=cfg["vocab_size"], d_model=d, num_heads=heads, head_dim=d // heads,
        mlp_dim=cfg.get("n_inner") or 4 * d, num_layers=cfg["n_layer"], mlp_activations=(HF_ACTIVATIONS[act],),
        norm_type="layer", norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5), use_bias=True,
        position_embedding="learned", max_position_embeddings=cfg["n_positions"],
        scale_attention_scores=cfg.get("scale_attn_weights", True),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)))


def _prefix(reader: WeightReader) -> str:
    # The original OpenAI-converted checkpoints name weights without the "transformer." prefix.
    return "transformer." if "transformer.wte.weight" in reader else ""


def params_from_hf(reader: WeightReader, c: DecoderOnlyConfig) -> dict:
    d, h, hd, m, p = c.d_model, c.num_heads, c.head_dim, c.mlp_dim, _prefix(reader)

    def ln(name):
        return {"scale": reader.get(f"{name}.weight", (d,)), "bias": reader.get(f"{name}.bias", (d,))}

    decoder = {"final_norm": ln(f"{p}ln_f")}
    for i in range(c.num_layers):
        b = f"{p}h.{i}"
        qkv_w = reader.get(f"{b}.attn.c_attn.weight", (d, 3 * d)).reshape(d, 3, h, hd)
        qkv_b = reader.get(f"{b}.attn.c_attn.bias", (3 * d,)).reshape(3, h, hd)
        attn = {name: {"kernel": qkv_w[:, j], "bias": qkv_b[j]} for j, name in enumerate(("query", "key", "value"))}
        attn["out"] = {"kernel": reader.get(f"{b}.attn.c_proj.weight", (d, d)).reshape(h, hd, d),
                       "bias": reader.get(f"{b}.attn.c_proj.bias", (d,))}
        decoder[f"layers_{i}"] = {
            "self_attention_norm": ln(f"{b}.ln_1"), "self_attention": attn, "mlp_norm": ln(f"{b}.ln_2"),
            "mlp": {"wi": {"kernel": reader.get(f"{b}.mlp.c_fc.weight", (d, m)),
                           "bias": reader.get(f"{b}.mlp.c_fc.bias", (m,))},
                    "wo": {"kernel": reader.get(f"{b}.mlp.c_proj.weight", (m, d)),
                           "bias": reader.get(f"{b}.mlp.c_proj.bias", (d,))}},
        }
    params = {"token_embed": {"embedding": reader.get(f"{p}wte.weight", (c.vocab_size, d))},
              "position_embed": {"embedding": reader.get(f"{p}wpe.weight", (c.max_position_embeddings, d))},
              "decoder": decoder}
    if not c.tie_embeddings:
        params["logits_dense"] = {"kernel": reader.get("lm_head.weight", (c.vocab_size, d)).T}
    return params


def params_to_hf(params: dict, c: DecoderOnlyConfig) -> dict[str, np.ndarray]:
    d = c.d_model
    dec = params["decoder"]
    out = {"transformer.wte.weight": params["token_embed"]["embedding"],
           "transformer.wpe.weight": params["position_embed"]["embedding"]}

    def ln(name, tree):
        out[f"{name}.weight"], out[f"{name}.bias"] = tree["scale"], tree["bias"]

    ln("transformer.ln_f", dec["final_norm"])
    for i in range(c.num_layers):
        b, layer = f"transformer.h.{i}", dec[f"layers_{i}"]
        att, mlp = layer["self_attention"], layer["mlp"]
        qkv = ("query", "key", "value")
        out[f"{b}.attn.c_attn.weight"] = np.concatenate([att[k]["kernel"].reshape(d, d) for k in qkv], axis=1)
        out[f"{b}.attn.c_attn.bias"] = np.concatenate([att[k]["bias"].reshape(d) for k in qkv])
        out[f"{b}.attn.c_proj.weight"] = att["out"]["kernel"].reshape(d, d)
        out[f"{b}.attn.c_proj.bias"] = att["out"]["bias"]
        out[f"{b}.mlp.c_fc.weight"], out[f"{b}.mlp.c_fc.bias"] = mlp["wi"]["kernel"], mlp["wi"]["bias"]
        out[f"{b}.mlp.c_proj.weight"], out[f"{b}.mlp.c_proj.bias"] = mlp["wo"]["kernel"], mlp["wo"]["bias"]
        ln(f"{b}.ln_1", layer["self_attention_norm"])
        ln(f"{b}.ln_2", layer["mlp_norm"])
    if not c.tie_embeddings:
        out["lm_head.weight"] = params["logits_dense"]["kernel"].T
    return out


def can_export(c) -> bool:
    return (isinstance(c, DecoderOnlyConfig) and c.position_embedding == "learned" and c.norm_type == "layer"
            and c.norm_position == "pre" and c.use_bias and len(c.mlp_activations) == 1
            and c.mlp_activations[0] in TO_HF_ACTIVATION and c.kv_heads == c.num_heads
            and c.num_heads * c.head_dim == c.d_model and c.sliding_window is None
            and not c.scale_tied_logits)


def config_to_hf(c: DecoderOnlyConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_embd": c.d_model, "n_head": c.num_heads, "n_layer": c.num_layers,
        "n_inner": c.mlp_dim, "n_positions": c.max_position_embeddings,
        "activation_function": TO_HF_ACTIVATION[c.mlp_activations[0]], "layer_norm_epsilon": c.norm_epsilon,
        "scale_attn_weights": c.scale_attention_scores, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": c.tie_embeddings,
        "resid_pdrop": c.dropout_rate, "embd_pdrop": c.dropout_rate, "attn_pdrop": c.dropout_rate,
        "dtype": "float32", "torch_dtype": "float32",
    }


CONVERTER = register(Converter(
    architectures=("GPT2LMHeadModel",), model_types=("gpt2",), config_class=DecoderOnlyConfig,
    config_from_hf=config_from_hf, params_from_hf=params_from_hf, config_to_hf=config_to_hf,
    params_to_hf=params_to_hf, can_export=can_export,
    # Causal-mask buffers that older transformers versions saved; a tied lm_head copy.
    ignored_weights=(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight"),
))
