"""Hugging Face converter: Llama and Mistral (rotary, RMSNorm, gated MLP, grouped-query attention).

HF applies rotary embeddings in the "rotate half" layout, which is what `apply_rotary` does, so
query and key projections are copied without permuting their rows. A `rope_scaling` (linear,
dynamic, yarn, llama3) becomes the config's `RopeScaling`, which uses HF's formulas. Mistral
differs from Llama only by its sliding window, whose HF mask (key j visible to query i iff
i - j < window) is ours.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from t5x_like.interop.converter import Converter, HFInteropError, WeightReader, register
from t5x_like.layers.positions import ROPE_SCALING_TYPES, RopeScaling, RopeScalingError
from t5x_like.models.config import DecoderOnlyConfig

# HF hidden_act -> our activation name; the MLP is always act(gate) * up.
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
TO_HF_ACTIVATION = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def rope_theta(cfg: dict, source: str = "config.json") -> float:
    """rope_theta from transformers 5 (`rope_parameters`) or 4 (top-level `rope_theta`)."""
    return rope_settings(cfg, source)[0]


def rope_settings(cfg: dict, source: str = "config.json") -> tuple[float, Optional[RopeScaling]]:
    """(rope_theta, RopeScaling or None) from transformers 5's `rope_parameters` or 4's `rope_theta` +
    `rope_scaling`, read as transformers does: a non-empty rope_scaling wins, and the pretraining
    length of yarn / llama3 defaults to a top-level original_max_position_embeddings, then to
    max_position_embeddings; dynamic NTK scales beyond max_position_embeddings itself."""
    params = cfg.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        raise HFInteropError(f"{source}: per-layer-type rope_parameters {sorted(params)} are not supported")
    field, spec = ("rope_scaling", cfg["rope_scaling"]) if cfg.get("rope_scaling") else ("rope_parameters", params)
    theta = float(spec.get("rope_theta", params.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING_TYPES:
        raise HFInteropError(f"{source}: {field}.rope_type={kind!r} is not supported; use one of "
                             f"{', '.join(('default',) + ROPE_SCALING_TYPES)}")
    if spec.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise HFInteropError(f"{source}: partial_rotary_factor != 1 is not supported (t5x_like rotates whole heads)")
    max_len = cfg.get("max_position_embeddings", 2048)
    if kind in ("yarn", "llama3"):
        orig = int(cfg.get("original_max_position_embeddings") or spec.get("original_max_position_embeddings")
                   or max_len)
    else:  # linear needs none; dynamic's is max_position_embeddings
        orig = max_len if kind == "dynamic" else None
    fields = {k: spec[k] for k in _HF_SCALING_KEYS[kind] if spec.get(k) is not None}
    factor = spec.get("factor")
    if factor is None and kind == "yarn":
        factor = max_len / orig  # DeepSeek-style configs: the ratio of the two lengths
    try:
        return theta, RopeScaling(rope_type=kind, factor=factor, original_max_position_embeddings=orig, **fields)
    except RopeScalingError as e:
        raise HFInteropError(f"{source}: {field}: {e}") from None


# The optional rope_parameters keys of each scheme (beyond rope_type, factor and the original length).
_HF_SCALING_KEYS = {"linear": (), "dynamic": (), "llama3": ("low_freq_factor", "high_freq_factor"),
                    "yarn": ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")}


def rope_parameters_to_hf(c: DecoderOnlyConfig) -> dict:
    """transformers' rope_parameters dict for our rotary settings (the inverse of `rope_settings`)."""
    out = {"rope_type": "default", "rope_theta": c.rotary_theta}
    s = c.rope_scaling
    if s is not None:
        out.update(rope_type=s.rope_type, factor=s.factor)
        if s.rope_type in ("yarn", "llama3"):  # dynamic's original length is max_position_embeddings
            out["original_max_position_embeddings"] = s.original_max_position_embeddings
        out.update({k: getattr(s, k) for k in _HF_SCALING_KEYS.get(s.rope_type, ()) if getattr(s, k) is not None})
    return out


def config_from_hf(cfg: dict) -> DecoderOnlyConfig:
    source = f"{cfg.get('model_type', 'llama')} config.json"
    for field in ("attention_bias", "mlp_bias"):
        if cfg.get(field):
            raise HFInteropError(f"{source}: {field}=true is not supported (t5x_like's Llama has no biases)")
    act = cfg.get("hidden_act", "silu")
    if act not in HF_ACTIVATIONS:
        raise HFInteropError(f"{source}: hidden_act={act!r} is not supported; use one of {sorted(HF_ACTIVATIONS)}")
    heads = cfg["num_attention_heads"]
    theta, scaling = rope_settings(cfg, source)
    return DecoderOnlyConfig(
        vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        mlp_dim=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
        mlp_activations=(HF_ACTIVATIONS[act], "linear"), norm_type="rms",
        norm_epsilon=cfg.get("rms_norm_eps", 1e-6), position_embedding="rotary",
        rotary_theta=theta, rope_scaling=scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        sliding_window=cfg.get("sliding_window") if cfg.get("model_type") == "mistral" else None,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), scale_attention_scores=True)


def _layer_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}"
    return {"q": f"{p}.self_attn.q_proj.weight", "k": f"{p}.self_attn.k_proj.weight",
            "v": f"{p}.self_attn.v_proj.weight", "o": f"{p}.self_attn.o_proj.weight",
            "gate": f"{p}.mlp.gate_proj.weight", "up": f"{p}.mlp.up_proj.weight",
            "down": f"{p}.mlp.down_proj.weight", "ln1": f"{p}.input_layernorm.weight",
            "ln2": f"{p}.post_attention_layernorm.weight"}


def params_from_hf(reader: WeightReader, c: DecoderOnlyConfig, mlp_from_hf=None) -> dict:
    """`mlp_from_hf(reader, config, layer_index)` replaces the dense MLP (hf_mixtral's experts)."""
    d, h, kv, hd, m = c.d_model, c.num_heads, c.kv_heads, c.head_dim, c.mlp_dim
    decoder = {"final_norm": {"scale": reader.get("model.norm.weight", (d,))}}

    def proj(name, heads):
        # torch Linear weights are [out, in]; our kernels are [in, ...out] with heads split.
        return reader.get(name, (heads * hd, d)).T.reshape(d, heads, hd)

    for i in range(c.num_layers):
        n = _layer_names(i)
        decoder[f"layers_{i}"] = {
            "self_attention_norm": {"scale": reader.get(n["ln1"], (d,))},
            "self_attention": {"query": {"kernel": proj(n["q"], h)}, "key": {"kernel": proj(n["k"], kv)},
                               "value": {"kernel": proj(n["v"], kv)},
                               "out": {"kernel": reader.get(n["o"], (d, h * hd)).T.reshape(h, hd, d)}},
            "mlp_norm": {"scale": reader.get(n["ln2"], (d,))},
            "mlp": mlp_from_hf(reader, c, i) if mlp_from_hf else {
                "wi_0": {"kernel": reader.get(n["gate"], (m, d)).T},
                "wi_1": {"kernel": reader.get(n["up"], (m, d)).T},
                "wo": {"kernel": reader.get(n["down"], (d, m)).T}},
        }
    params = {"token_embed": {"embedding": reader.get("model.embed_tokens.weight", (c.vocab_size, d))},
              "decoder": decoder}
    if not c.tie_embeddings:
        params["logits_dense"] = {"kernel": reader.get("lm_head.weight", (c.vocab_size, d)).T}
    return params


def params_to_hf(params: dict, c: DecoderOnlyConfig, mlp_to_hf=None) -> dict[str, np.ndarray]:
    """`mlp_to_hf(mlp_params, config, layer_index)` -> {hf_name: array} replaces the dense MLP."""
    d, dec = c.d_model, params["decoder"]
    out = {"model.embed_tokens.weight": params["token_embed"]["embedding"],
           "model.norm.weight": dec["final_norm"]["scale"]}
    for i in range(c.num_layers):
        n, layer = _layer_names(i), dec[f"layers_{i}"]
        att, mlp = layer["self_attention"], layer["mlp"]
        for name, key in (("q", "query"), ("k", "key"), ("v", "value")):
            out[n[name]] = att[key]["kernel"].reshape(d, -1).T
        out[n["o"]] = att["out"]["kernel"].reshape(-1, d).T
        if mlp_to_hf:
            out.update(mlp_to_hf(mlp, c, i))
        else:
            out[n["gate"]], out[n["up"]], out[n["down"]] = (mlp[k]["kernel"].T for k in ("wi_0", "wi_1", "wo"))
        out[n["ln1"]] = layer["self_attention_norm"]["scale"]
        out[n["ln2"]] = layer["mlp_norm"]["scale"]
    if not c.tie_embeddings:
        out["lm_head.weight"] = params["logits_dense"]["kernel"].T
    return out


def can_export(c) -> bool:
    acts = tuple(c.mlp_activations) if isinstance(c, DecoderOnlyConfig) else ()
    return (isinstance(c, DecoderOnlyConfig) and not c.num_experts and c.position_embedding == "rotary" and c.norm_type == "rms"
            and c.norm_position == "pre" and not c.use_bias and len(acts) == 2
            and acts[0] in TO_HF_ACTIVATION and acts[1] == "linear" and c.scale_attention_scores
            and not c.scale_tied_logits)


def config_to_hf(c: DecoderOnlyConfig) -> dict:
    mistral = c.sliding_window is not None
    out = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
        "hidden_act": TO_HF_ACTIVATION[c.mlp_activations[0]], "rms_norm_eps": c.norm_epsilon,
        "max_position_embeddings": _hf_max_positions(c),
        # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta (and rope_scaling).
        "rope_theta": c.rotary_theta,
        "rope_parameters": rope_parameters_to_hf(c),
        "tie_word_embeddings": c.tie_embeddings, "attention_dropout": 0.0,
        "dtype": "float32", "torch_dtype": "float32",  # hf.save writes float32 weights
    }
    if c.rope_scaling is not None:  # transformers 5 also prefers rope_scaling when both are there
        out["rope_scaling"] = out["rope_parameters"]
    if mistral:
        out["sliding_window"] = c.sliding_window
    else:
        out.update(attention_bias=False, mlp_bias=False)
    return out


def _hf_max_positions(c: DecoderOnlyConfig) -> int:
    """HF dynamic NTK scales beyond max_position_embeddings, which is our original length then."""
    s = c.rope_scaling
    dynamic = s is not None and s.rope_type == "dynamic"
    return s.original_max_position_embeddings if dynamic else c.max_position_embeddings


CONVERTER = register(Converter(
    architectures=("LlamaForCausalLM", "MistralForCausalLM"), model_types=("llama", "mistral"),
    config_class=DecoderOnlyConfig,
    config_from_hf=config_from_hf, params_from_hf=params_from_hf, config_to_hf=config_to_hf,
    params_to_hf=params_to_hf, can_export=can_export,
    # Older checkpoints store rotary inverse frequencies; tied checkpoints may still carry lm_head.
    ignored_weights=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"lm_head\.weight"),
))
