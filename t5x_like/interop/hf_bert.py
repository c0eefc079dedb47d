"""Hugging Face converters: BERT with its masked-LM head (BertForMaskedLM, BertForPreTraining), and
BERT with a sequence-classification head (BertForSequenceClassification).

BERT is a post-norm encoder with biases everywhere, learned absolute positions, token-type
embeddings and a norm after the embeddings; `EncoderOnlyConfig` expresses all of it. The NSP
head and pooler of BertForPreTraining have no counterpart and are skipped. A sequence classifier
is `EncoderClassifierConfig` with `pooling="first"`: its pooler and classifier map one to one.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from t5x_like.interop.converter import Converter, HFInteropError, WeightReader, register
from t5x_like.models.config import EncoderOnlyConfig
from t5x_like.models.encoder_classifier import EncoderClassifierConfig

# HF hidden_act -> our activation. gelu_pytorch_tanh is the same function as gelu_new.
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def config_from_hf(c: dict) -> EncoderOnlyConfig:
    def fail(msg):
        raise HFInteropError(f"BERT config.json: {msg}")

    pos_type = c.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        fail(f"position_embedding_type={pos_type!r} is not supported; only 'absolute' positions convert")
    if c.get("is_decoder") or c.get("add_cross_attention"):
        fail("is_decoder/add_cross_attention are set; only the bidirectional encoder converts")
    act = c.get("hidden_act", "gelu")
    if act not in _ACT_FROM_HF:
        fail(f"hidden_act={act!r} is not supported; use one of {sorted(_ACT_FROM_HF)}")
    if c.get("pad_token_id", 0) not in (0, None):
        # Our encoder treats id 0 as padding, so another pad id would silently mask real tokens.
        fail(f"pad_token_id={c['pad_token_id']}; t5x_like encoders need padding id 0")
    if not c.get("type_vocab_size", 2):
        fail("type_vocab_size must be at least 1")
    d_model, heads = c.get("hidden_size", 768), c.get("num_attention_heads", 12)
    if d_model % heads:
        fail(f"hidden_size={d_model} is not a multiple of num_attention_heads={heads}")
    return EncoderOnlyConfig(
        vocab_size=c.get("vocab_size", 30522), d_model=d_model, num_heads=heads, head_dim=d_model // heads,
        mlp_dim=c.get("intermediate_size", 3072), num_layers=c.get("num_hidden_layers", 12),
        mlp_activations=(_ACT_FROM_HF[act],), mlm_head_activation=_ACT_FROM_HF[act],
        norm_type="layer", norm_epsilon=c.get("layer_norm_eps", 1e-12), norm_position="post", use_bias=True,
        position_embedding="learned", max_position_embeddings=c.get("max_position_embeddings", 512),
        type_vocab_size=c.get("type_vocab_size", 2), embedding_norm=True,
        tie_embeddings=c.get("tie_word_embeddings", True), scale_attention_scores=True,
        dropout_rate=float(c.get("hidden_dropout_prob", 0.0)))


def _export_problems(cfg, mlm_head: bool = True) -> list[str]:
    """Every way `cfg` differs from what BertForMaskedLM (or, without `mlm_head`, BERT's encoder)
    can compute."""
    acts = cfg.mlp_activations
    checks = [
        (cfg.norm_type == "layer", f"norm_type={cfg.norm_type!r} (BERT uses 'layer')"),
        (cfg.norm_position == "post", f"norm_position={cfg.norm_position!r} (BERT uses 'post')"),
        (cfg.use_bias, "use_bias=False (BERT has biases)"),
        (cfg.position_embedding == "learned", f"position_embedding={cfg.position_embedding!r} (BERT: 'learned')"),
        (cfg.kv_heads == cfg.num_heads, f"num_kv_heads={cfg.num_kv_heads} (BERT has no grouped-query attention)"),
        (cfg.num_heads * cfg.head_dim == cfg.d_model, "num_heads * head_dim != d_model"),
        (len(acts) == 1 and acts[0] in _ACT_TO_HF, f"mlp_activations={acts} (BERT: one of {sorted(_ACT_TO_HF)})"),
        (not mlm_head or cfg.mlm_head_activation == acts[0], f"mlm_head_activation={cfg.mlm_head_activation!r} "
                                                             "differs from the MLP activation (BERT uses hidden_act "
                                                             "for both)"),
        (cfg.embedding_norm, "embedding_norm=False"),
        (cfg.type_vocab_size >= 1, "type_vocab_size=0 (BERT needs at least 1)"),
        (cfg.scale_attention_scores, "scale_attention_scores=False"),
        (cfg.sliding_window is None, f"sliding_window={cfg.sliding_window}"),
        (not cfg.scale_tied_logits, "scale_tied_logits=True"),
    ]
    return [msg for ok, msg in checks if not ok]


def config_to_hf(cfg: EncoderOnlyConfig) -> dict:
    problems = _export_problems(cfg)
    if problems:
        raise HFInteropError("cannot export as BertForMaskedLM: " + "; ".join(problems))
    return _bert_config_to_hf(cfg, "BertForMaskedLM")


def _bert_config_to_hf(cfg: EncoderOnlyConfig, architecture: str) -> dict:
    return {
        "architectures": [architecture], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim, "hidden_act": _ACT_TO_HF[cfg.mlp_activations[0]],
        "hidden_dropout_prob": cfg.dropout_rate, "attention_probs_dropout_prob": cfg.dropout_rate,
        "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_epsilon, "pad_token_id": 0, "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": "float32",  # hf.save always writes float32 weights
    }


def _dense_from_hf(r: WeightReader, name: str, in_shape: tuple, out_shape: tuple) -> dict:
    """torch Linear ([out, in] weight) -> DenseGeneral kernel [*in, *out], bias [*out]."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    return {"kernel": r.get(f"{name}.weight", (n_out, n_in)).T.reshape(in_shape + out_shape),
            "bias": r.get(f"{name}.bias", (n_out,)).reshape(out_shape)}


def _dense_to_hf(p: dict, name: str, n_in_axes: int) -> dict:
    kernel = p["kernel"]
    n_in = int(np.prod(kernel.shape[:n_in_axes]))
    return {f"{name}.weight": kernel.reshape(n_in, -1).T, f"{name}.bias": p["bias"].reshape(-1)}


def _norm_from_hf(r: WeightReader, name: str, d: int) -> dict:
    return {"scale": r.get(f"{name}.weight", (d,)), "bias": r.get(f"{name}.bias", (d,))}


def _norm_to_hf(p: dict, name: str) -> dict:
    return {f"{name}.weight": p["scale"], f"{name}.bias": p["bias"]}


def _layer_names(i: int) -> dict:
    """Our sub-tree name -> HF module name, for layer i."""
    pre = f"bert.encoder.layer.{i}"
    return {"query": f"{pre}.attention.self.query", "key": f"{pre}.attention.self.key",
            "value": f"{pre}.attention.self.value", "out": f"{pre}.attention.output.dense",
            "self_attention_norm": f"{pre}.attention.output.LayerNorm", "wi": f"{pre}.intermediate.dense",
            "wo": f"{pre}.output.dense", "mlp_norm": f"{pre}.output.LayerNorm"}


def _encoder_from_hf(r: WeightReader, cfg: EncoderOnlyConfig) -> dict:
    """Embeddings and the encoder stack (`EncoderOnly.setup_encoder`'s parameters)."""
    d, h, hd, v = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.vocab_size
    emb = "bert.embeddings"
    params = {
        "token_embed": {"embedding": r.get(f"{emb}.word_embeddings.weight", (v, d))},
        "position_embed": {"embedding": r.get(f"{emb}.position_embeddings.weight",
                                              (cfg.max_position_embeddings, d))},
        "type_embed": {"embedding": r.get(f"{emb}.token_type_embeddings.weight", (cfg.type_vocab_size, d))},
        "embed_norm": _norm_from_hf(r, f"{emb}.LayerNorm", d),
    }
    encoder = {}
    for i in range(cfg.num_layers):
        n = _layer_names(i)
        attn = {k: _dense_from_hf(r, n[k], (d,), (h, hd)) for k in ("query", "key", "value")}
        attn["out"] = _dense_from_hf(r, n["out"], (h, hd), (d,))
        encoder[f"layers_{i}"] = {
            "self_attention": attn, "self_attention_norm": _norm_from_hf(r, n["self_attention_norm"], d),
            "mlp": {"wi": _dense_from_hf(r, n["wi"], (d,), (cfg.mlp_dim,)),
                    "wo": _dense_from_hf(r, n["wo"], (cfg.mlp_dim,), (d,))},
            "mlp_norm": _norm_from_hf(r, n["mlp_norm"], d)}
    params["encoder"] = encoder
    return params


def params_from_hf(r: WeightReader, cfg: EncoderOnlyConfig) -> dict:
    d, v = cfg.d_model, cfg.vocab_size
    params = _encoder_from_hf(r, cfg)
    params["mlm_transform"] = _dense_from_hf(r, "cls.predictions.transform.dense", (d,), (d,))
    params["mlm_norm"] = _norm_from_hf(r, "cls.predictions.transform.LayerNorm", d)
    # Untied heads use the decoder's own bias; tied ones share cls.predictions.bias (older
    # transformers also saved it as decoder.bias).
    untied_bias = not cfg.tie_embeddings and "cls.predictions.decoder.bias" in r
    params["mlm_bias"] = r.get("cls.predictions.decoder.bias" if untied_bias else "cls.predictions.bias", (v,))
    if not cfg.tie_embeddings:
        params["logits_dense"] = {"kernel": r.get("cls.predictions.decoder.weight", (v, d)).T}
    return params


def _encoder_to_hf(params: dict, cfg: EncoderOnlyConfig) -> dict:
    emb = "bert.embeddings"
    out = {f"{emb}.word_embeddings.weight": params["token_embed"]["embedding"],
           f"{emb}.position_embeddings.weight": params["position_embed"]["embedding"],
           f"{emb}.token_type_embeddings.weight": params["type_embed"]["embedding"],
           **_norm_to_hf(params["embed_norm"], f"{emb}.LayerNorm")}
    for i in range(cfg.num_layers):
        n, layer = _layer_names(i), params["encoder"][f"layers_{i}"]
        attn, mlp = layer["self_attention"], layer["mlp"]
        for k in ("query", "key", "value"):
            out.update(_dense_to_hf(attn[k], n[k], 1))
        out.update(_dense_to_hf(attn["out"], n["out"], 2))
        out.update(_dense_to_hf(mlp["wi"], n["wi"], 1))
        out.update(_dense_to_hf(mlp["wo"], n["wo"], 1))
        out.update(_norm_to_hf(layer["self_attention_norm"], n["self_attention_norm"]))
        out.update(_norm_to_hf(layer["mlp_norm"], n["mlp_norm"]))
    return out


def params_to_hf(params: dict, cfg: EncoderOnlyConfig) -> dict:
    out = {**_encoder_to_hf(params, cfg),
           **_dense_to_hf(params["mlm_transform"], "cls.predictions.transform.dense", 1),
           **_norm_to_hf(params["mlm_norm"], "cls.predictions.transform.LayerNorm"),
           "cls.predictions.bias": params["mlm_bias"]}
    if not cfg.tie_embeddings:
        out["cls.predictions.decoder.weight"] = params["logits_dense"]["kernel"].T
        out["cls.predictions.decoder.bias"] = params["mlm_bias"]
    return out


CONVERTER = register(Converter(
    architectures=("BertForMaskedLM", "BertForPreTraining"),
    model_types=("bert",), config_class=EncoderOnlyConfig,
    config_from_hf=config_from_hf,
    params_from_hf=params_from_hf,
    config_to_hf=config_to_hf,
    params_to_hf=params_to_hf,
    # Exporting a non-BERT encoder fails in config_to_hf with the list of what differs.
    can_export=lambda cfg: isinstance(cfg, EncoderOnlyConfig),
    ignored_weights=(r"bert\.pooler\..*", r"cls\.seq_relationship\..*", r".*\.position_ids",
                     r".*\.token_type_ids", r"cls\.predictions\.decoder\.(weight|bias)", r"cls\.predictions\.bias"),
))


# ------------------------------------------------------------- BertForSequenceClassification


def classifier_config_from_hf(c: dict) -> EncoderClassifierConfig:
    problem = c.get("problem_type")
    if problem == "multi_label_classification":
        raise HFInteropError("BERT config.json: problem_type='multi_label_classification' (independent sigmoid "
                             "labels) is not supported; t5x_like classifiers pick one class (softmax) or regress")
    num_classes = len(c["id2label"]) if c.get("id2label") else int(c.get("num_labels", 2))
    if problem == "regression" and num_classes != 1:
        raise HFInteropError(f"BERT config.json: problem_type='regression' with {num_classes} labels; t5x_like "
                             "regresses one score (num_labels=1)")
    fields = {f.name: getattr(config_from_hf(c), f.name) for f in dataclasses.fields(EncoderOnlyConfig)}
    return EncoderClassifierConfig(**fields, num_classes=num_classes, pooling="first")


def classifier_config_to_hf(cfg: EncoderClassifierConfig) -> dict:
    problems = _export_problems(cfg, mlm_head=False)
    if cfg.pooling != "first":
        problems.append(f"pooling={cfg.pooling!r} (BERT pools the first token: 'first')")
    if problems:
        raise HFInteropError("cannot export as BertForSequenceClassification: " + "; ".join(problems))
    labels = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
    return {**_bert_config_to_hf(cfg, "BertForSequenceClassification"), "id2label": labels,
            "label2id": {name: int(i) for i, name in labels.items()}, "classifier_dropout": None,
            "problem_type": "regression" if cfg.num_classes == 1 else "single_label_classification"}


def classifier_params_from_hf(r: WeightReader, cfg: EncoderClassifierConfig) -> dict:
    return {**_encoder_from_hf(r, cfg),
            "pooler": _dense_from_hf(r, "bert.pooler.dense", (cfg.d_model,), (cfg.d_model,)),
            "classifier": _dense_from_hf(r, "classifier", (cfg.d_model,), (cfg.num_classes,))}


def classifier_params_to_hf(params: dict, cfg: EncoderClassifierConfig) -> dict:
    return {**_encoder_to_hf(params, cfg), **_dense_to_hf(params["pooler"], "bert.pooler.dense", 1),
            **_dense_to_hf(params["classifier"], "classifier", 1)}


CLASSIFIER_CONVERTER = register(Converter(
    architectures=("BertForSequenceClassification",),
    model_types=(),  # a config.json without architectures is read as BertForMaskedLM
    config_class=EncoderClassifierConfig,
    config_from_hf=classifier_config_from_hf,
    params_from_hf=classifier_params_from_hf,
    config_to_hf=classifier_config_to_hf,
    params_to_hf=classifier_params_to_hf,
    can_export=lambda cfg: isinstance(cfg, EncoderClassifierConfig),
    ignored_weights=(r".*\.position_ids", r".*\.token_type_ids"),
))
