"""Hugging Face converter: Mixtral (a Mistral whose every MLP is a top-2 mixture of SwiGLU experts).

Everything but the MLP is Llama/Mistral, so this module reuses `hf_llama` and only maps the experts.
Mixtral routes with a softmax over all experts, keeps the top k and rescales them to sum to one,
which is `MoeMlp` with `renormalize_top_k=True`. Hugging Face never drops tokens, so imports use
`moe_capacity_factor=None`; a capacity factor can be set afterwards for training
(`hf.load(path, moe_capacity_factor=1.25)`), which then differs from HF only where tokens are dropped.

Weight names: checkpoints store `block_sparse_moe.gate` and `block_sparse_moe.experts.{j}.w1/w2/w3`
(what transformers 4 and 5 both write); transformers 5's fused in-memory layout
(`mlp.gate`, `mlp.experts.gate_up_proj` [E, 2m, d], `mlp.experts.down_proj` [E, d, m]) is read too.
"""

from __future__ import annotations

import numpy as np

from t5x_like.interop import hf_llama
from t5x_like.interop.converter import Converter, HFInteropError, WeightReader, register
from t5x_like.models.config import DecoderOnlyConfig


def config_from_hf(cfg: dict) -> DecoderOnlyConfig:
    if cfg.get("num_experts_per_tok", 2) < 2:
        # HF rescales even a single expert's weight to 1; MoeMlp keeps k=1 weights raw (Switch).
        raise HFInteropError("mixtral config.json: num_experts_per_tok=1 is not supported (HF gives the one "
                             "expert weight 1, t5x_like's Switch routing keeps its probability); use k >= 2")
    base = hf_llama.config_from_hf({**cfg, "model_type": "mistral"})  # mistral: keeps the sliding window
    return base.replace(num_experts=cfg["num_local_experts"], moe_top_k=cfg.get("num_experts_per_tok", 2),
                        moe_every_n_layers=1, moe_capacity_factor=None, moe_renormalize_top_k=True,
                        moe_aux_loss_weight=float(cfg.get("router_aux_loss_coef", 0.001)), moe_z_loss_weight=0.0)


def _moe_prefix(i: int) -> str:
    return f"model.layers.{i}.block_sparse_moe"


def mlp_from_hf(reader: WeightReader, c: DecoderOnlyConfig, i: int) -> dict:
    d, m, e = c.d_model, c.mlp_dim, c.num_experts
    fused = f"model.layers.{i}.mlp"
    if f"{fused}.experts.gate_up_proj" in reader:
        gate_up = reader.get(f"{fused}.experts.gate_up_proj", (e, 2 * m, d))
        return {"router": {"kernel": reader.get(f"{fused}.gate.weight", (e, d)).T},
                "wi_0": np.transpose(gate_up[:, :m], (0, 2, 1)), "wi_1": np.transpose(gate_up[:, m:], (0, 2, 1)),
                "wo": np.transpose(reader.get(f"{fused}.experts.down_proj", (e, d, m)), (0, 2, 1))}
    p = _moe_prefix(i)
    experts = lambda w, shape: np.stack([reader.get(f"{p}.experts.{j}.{w}.weight", shape).T  # noqa: E731
                                         for j in range(e)])
    return {"router": {"kernel": reader.get(f"{p}.gate.weight", (e, d)).T},
            "wi_0": experts("w1", (m, d)), "wi_1": experts("w3", (m, d)), "wo": experts("w2", (d, m))}


def mlp_to_hf(mlp: dict, c: DecoderOnlyConfig, i: int) -> dict[str, np.ndarray]:
    p = _moe_prefix(i)
    out = {f"{p}.gate.weight": mlp["router"]["kernel"].T}
    for j in range(c.num_experts):
        for ours, theirs in (("wi_0", "w1"), ("wi_1", "w3"), ("wo", "w2")):
            out[f"{p}.experts.{j}.{theirs}.weight"] = mlp[ours][j].T
    return out


def params_from_hf(reader: WeightReader, c: DecoderOnlyConfig) -> dict:
    return hf_llama.params_from_hf(reader, c, mlp_from_hf=mlp_from_hf)


def params_to_hf(params: dict, c: DecoderOnlyConfig) -> dict[str, np.ndarray]:
    return hf_llama.params_to_hf(params, c, mlp_to_hf=mlp_to_hf)


def can_export(c) -> bool:
    """Mixtral's layout: every layer MoE, SwiGLU-like experts, no biases (capacity is not exported)."""
    if not isinstance(c, DecoderOnlyConfig) or not c.num_experts:
        return False
    return (hf_llama.can_export(c.replace(num_experts=0)) and c.moe_every_n_layers == 1
            and c.moe_group_size is None and c.moe_renormalize_top_k and c.moe_top_k > 1)


def config_to_hf(c: DecoderOnlyConfig) -> dict:
    out = hf_llama.config_to_hf(c.replace(num_experts=0))
    for key in ("attention_bias", "mlp_bias"):
        out.pop(key, None)
    out.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=c.num_experts,
               num_experts_per_tok=c.moe_top_k, router_aux_loss_coef=c.moe_aux_loss_weight,
               sliding_window=c.sliding_window, output_router_logits=False, router_jitter_noise=0.0)
    return out


CONVERTER = register(Converter(
    architectures=("MixtralForCausalLM",), model_types=("mixtral",), config_class=DecoderOnlyConfig,
    config_from_hf=config_from_hf, params_from_hf=params_from_hf, config_to_hf=config_to_hf,
    params_to_hf=params_to_hf, can_export=can_export,
    ignored_weights=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"lm_head\.weight"),
))
