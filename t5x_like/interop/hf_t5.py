"""Hugging Face converter: T5 (v1.0, v1.1 and relatives) <-> `EncoderDecoderConfig`.

The weight mapping is one table (`_layout`) read in both directions, so import and export cannot
drift apart. Two transformers facts shape it:

- transformers 5 ties `lm_head` to `shared` unless the checkpoint holds a different `lm_head.weight`
  (its config.json then still says `tie_word_embeddings: true`), so tying is decided from the
  weights. The d_model**-0.5 output scaling follows `scale_decoder_outputs` (older configs:
  `tie_word_embeddings`). Export writes what transformers 5's save_pretrained writes: no
  `lm_head.weight` when tied, and `tie_word_embeddings: false` when not, which transformers 4
  reads the same way.
- T5 has no 1/sqrt(head_dim) score scaling; a model trained with it is exported by folding the
  factor into the query weights.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from t5x_like.interop.converter import Converter, HFInteropError, WeightReader, register
from t5x_like.models.config import EncoderDecoderConfig

# T5Config defaults, used for fields a config.json leaves out (as transformers does).
_HF_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    dropout_rate=0.1, layer_norm_epsilon=1e-6, feed_forward_proj="relu")

# transformers ACT2FN names -> ours; several HF names are the same function.
_ACT_FROM_HF = {"relu": "relu", "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "silu": "silu",
                "swish": "silu", "linear": "linear"}
_ACT_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu", "linear": "linear"}


def _activations_from_hf(proj: str) -> tuple[str, ...]:
    parts = proj.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    # transformers reads "gated-gelu" as the tanh approximation (gelu_new), for backward compatibility.
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    if (len(parts) > 1 and not gated) or act not in _ACT_FROM_HF:
        raise HFInteropError(f"T5 feed_forward_proj={proj!r} is not supported; use one of "
                             f"{sorted(_ACT_FROM_HF)} or 'gated-' followed by one of them")
    return (_ACT_FROM_HF[act], "linear") if gated else (_ACT_FROM_HF[act],)


def _activations_to_hf(acts: tuple[str, ...]) -> str:
    if len(acts) == 1:
        return _ACT_TO_HF[acts[0]]
    if len(acts) == 2 and acts[1] == "linear":
        # "gated-gelu" already means tanh-GELU to transformers, so exact GELU needs another name.
        return {"gelu_tanh": "gated-gelu", "gelu": "gated-gelu_python"}.get(acts[0], f"gated-{_ACT_TO_HF[acts[0]]}")
    raise HFInteropError(f"mlp_activations={acts} has no T5 feed_forward_proj; T5 supports one "
                         "activation or a gated pair (activation, 'linear')")


def _scales_output(hf_config: dict) -> bool:
    return bool(hf_config.get("scale_decoder_outputs", hf_config.get("tie_word_embeddings", True) is not False))


def config_from_hf(c: dict) -> EncoderDecoderConfig:
    c = {**_HF_DEFAULTS, **{k: v for k, v in c.items() if v is not None}}
    tied = c.get("tie_word_embeddings", True) is not False
    if not tied and _scales_output(c):
        raise HFInteropError("T5 config with an untied lm_head and scale_decoder_outputs=true is not "
                             "supported; t5x_like scales the output only with tied embeddings")
    return EncoderDecoderConfig(
        vocab_size=c["vocab_size"], d_model=c["d_model"], num_heads=c["num_heads"], head_dim=c["d_kv"],
        mlp_dim=c["d_ff"], mlp_activations=_activations_from_hf(c["feed_forward_proj"]),
        num_encoder_layers=c["num_layers"], num_decoder_layers=c.get("num_decoder_layers", c["num_layers"]),
        relative_num_buckets=c["relative_attention_num_buckets"],
        relative_max_distance=c["relative_attention_max_distance"],
        norm_type="rms", norm_epsilon=c["layer_norm_epsilon"], norm_position="pre", use_bias=False,
        position_embedding="relative", scale_attention_scores=False,
        tie_embeddings=tied, scale_tied_logits=tied and _scales_output(c), dropout_rate=c["dropout_rate"])


def config_to_hf(cfg: EncoderDecoderConfig) -> dict:
    problems = [msg for bad, msg in [
        (cfg.norm_type != "rms", f"norm_type={cfg.norm_type!r} (T5 uses 'rms')"),
        (cfg.norm_position != "pre", f"norm_position={cfg.norm_position!r} (T5 uses 'pre')"),
        (cfg.use_bias, "use_bias=True (T5 has no biases)"),
        (cfg.kv_heads != cfg.num_heads, f"num_kv_heads={cfg.num_kv_heads} (T5 has multi-head attention only)"),
        (cfg.sliding_window is not None, f"sliding_window={cfg.sliding_window} (T5 attends to all positions)"),
        (cfg.position_embedding != "relative", f"position_embedding={cfg.position_embedding!r} (T5 uses 'relative')"),
    ] if bad]
    if problems:
        raise HFInteropError("cannot export to Hugging Face T5: " + "; ".join(problems))
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.mlp_dim,
        "num_heads": cfg.num_heads, "num_layers": cfg.num_encoder_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "relative_attention_num_buckets": cfg.relative_num_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "layer_norm_epsilon": cfg.norm_epsilon, "feed_forward_proj": _activations_to_hf(cfg.mlp_activations),
        "dropout_rate": cfg.dropout_rate, "initializer_factor": 1.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_decoder_outputs": cfg.tie_embeddings and cfg.scale_tied_logits,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "use_cache": True,
        "dtype": "float32",  # hf.save writes float32 weights
    }


class _Entry(NamedTuple):
    path: tuple[str, ...]                        # in our params tree
    name: str                                    # HF weight name
    shape: tuple[int, ...]                       # HF shape
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _layout(cfg: EncoderDecoderConfig, scale_query: float = 1.0) -> list[_Entry]:
    """Every weight of the model; `scale_query` is folded into HF's q weights (T5 scales no scores)."""
    d, h, k, f = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    same = lambda x: x  # noqa: E731

    # torch Linear weights are [out, in]; our kernels are [in, ...out] with heads split out.
    def dense(out, inp):
        return (out, inp), lambda w: w.T, lambda w: w.T

    def heads_in(factor=1.0):
        return (h * k, d), lambda w: w.T.reshape(d, h, k) / factor, lambda w: w.reshape(d, h * k).T * factor
    heads_out = ((d, h * k), lambda w: w.T.reshape(h, k, d), lambda w: w.reshape(h * k, d).T)

    entries = [_Entry(("token_embed", "embedding"), "shared.weight", (cfg.vocab_size, d), same, same)]
    if not cfg.tie_embeddings:
        entries.append(_Entry(("logits_dense", "kernel"), "lm_head.weight", *dense(cfg.vocab_size, d)))
    for stack, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        entries.append(_Entry((stack, "relpos_bias", "rel_embedding"),
                              f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                              (cfg.relative_num_buckets, h), same, same))
        entries.append(_Entry((stack, "final_norm", "scale"), f"{stack}.final_layer_norm.weight", (d,), same, same))
        subs = [("self_attention", "SelfAttention")]
        if stack == "decoder":
            subs.append(("cross_attention", "EncDecAttention"))
        wis = ["wi"] if len(cfg.mlp_activations) == 1 else [f"wi_{j}" for j in range(len(cfg.mlp_activations))]
        for i in range(n):
            ours, theirs = (stack, f"layers_{i}"), f"{stack}.block.{i}.layer"
            for j, (attn, hf_attn) in enumerate(subs):
                for proj, hf_proj, spec in (("query", "q", heads_in(scale_query)), ("key", "k", heads_in()),
                                            ("value", "v", heads_in()), ("out", "o", heads_out)):
                    entries.append(_Entry((*ours, attn, proj, "kernel"), f"{theirs}.{j}.{hf_attn}.{hf_proj}.weight",
                                          *spec))
                entries.append(_Entry((*ours, f"{attn}_norm", "scale"), f"{theirs}.{j}.layer_norm.weight",
                                      (d,), same, same))
            m = len(subs)
            for wi in wis:
                entries.append(_Entry((*ours, "mlp", wi, "kernel"), f"{theirs}.{m}.DenseReluDense.{wi}.weight",
                                      *dense(f, d)))
            entries.append(_Entry((*ours, "mlp", "wo", "kernel"), f"{theirs}.{m}.DenseReluDense.wo.weight",
                                  *dense(d, f)))
            entries.append(_Entry((*ours, "mlp_norm", "scale"), f"{theirs}.{m}.layer_norm.weight", (d,), same, same))
    return entries


def config_from_weights(cfg: EncoderDecoderConfig, reader: WeightReader) -> EncoderDecoderConfig:
    head, shared = reader.weights.get("lm_head.weight"), reader.weights.get("shared.weight")
    if not cfg.tie_embeddings or head is None or (
            shared is not None and head.shape == shared.shape and np.array_equal(head, shared)):
        return cfg
    if cfg.scale_tied_logits:
        raise HFInteropError(f"{reader.source}: lm_head.weight differs from shared.weight while config.json "
                             "scales decoder outputs by d_model**-0.5; t5x_like scales only a tied head")
    return cfg.replace(tie_embeddings=False)


def params_from_hf(reader: WeightReader, cfg: EncoderDecoderConfig) -> dict:
    params: dict = {}
    for e in _layout(cfg):
        # transformers ties lm_head to shared when the checkpoint has no lm_head.weight.
        name = "shared.weight" if e.name == "lm_head.weight" and e.name not in reader else e.name
        node = params
        for key in e.path[:-1]:
            node = node.setdefault(key, {})
        node[e.path[-1]] = e.to_ours(reader.get(name, e.shape))
    return params


def params_to_hf(params: dict, cfg: EncoderDecoderConfig) -> dict:
    out = {}
    for e in _layout(cfg, scale_query=cfg.head_dim ** -0.5 if cfg.scale_attention_scores else 1.0):
        value = params
        for key in e.path:
            value = value[key]
        out[e.name] = e.to_hf(np.asarray(value, np.float32))
    return out


def can_export(cfg) -> bool:
    return isinstance(cfg, EncoderDecoderConfig) and cfg.position_embedding == "relative"


CONVERTER = register(Converter(
    architectures=("T5ForConditionalGeneration", "T5WithLMHeadModel"), model_types=("t5",),
    config_class=EncoderDecoderConfig,
    config_from_hf=config_from_hf, params_from_hf=params_from_hf, config_to_hf=config_to_hf,
    params_to_hf=params_to_hf, can_export=can_export, config_from_weights=config_from_weights,
    # Copies of shared.weight that older checkpoints store (lm_head only when tied, i.e. equal),
    # and a bias transformers never uses.
    ignored_weights=(r"(encoder|decoder)\.embed_tokens\.weight", r"lm_head\.weight",
                     r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight")))
