"""BERT-style encoder with a masked-LM head.

The network, and the model that owns its features and FLOPs (models/base.py); it cannot decode.
"""

from __future__ import annotations

from typing import Mapping, Optional

import flax.linen as nn
import gin

from t5x_like.layers.attention import make_encoder_mask
from t5x_like.layers.dense import DenseGeneral
from t5x_like.layers.embeddings import Embed
from t5x_like.layers.mlp import ACTIVATION_FNS
from t5x_like.layers.norms import Norm
from t5x_like.layers.lora import LoraConfig
from t5x_like.models.base import BaseModel
from t5x_like.models.config import EncoderOnlyConfig
from t5x_like.models.flops import attention_flops, matmul_params, unembedding_params
from t5x_like.models.network_base import NetworkBase, default_positions
from t5x_like.models.registry import register
from t5x_like.models.transformer import TransformerStack, dtypes


class EncoderOnly(NetworkBase):
    config: EncoderOnlyConfig

    def setup_encoder(self):
        """Everything `encode` uses (embeddings, token types, embedding norm, the encoder stack);
        a network on top of the encoder (models/encoder_classifier.py) adds its own head."""
        cfg = self.config
        dtype, param_dtype = dtypes(cfg)
        self.setup_embeddings()
        if cfg.type_vocab_size:
            self.type_embed = Embed(cfg.type_vocab_size, cfg.d_model, axes=("token_types", "embed"),
                                    embedding_init=nn.initializers.normal(0.02), dtype=dtype,
                                    param_dtype=param_dtype)
        if cfg.embedding_norm:
            self.embed_norm = Norm(cfg.norm_type, cfg.norm_epsilon, dtype=dtype, param_dtype=param_dtype)
        self.encoder = TransformerStack(cfg, cfg.num_layers, causal=False)

    def setup(self):
        cfg = self.config
        dtype, param_dtype = dtypes(cfg)
        self.setup_encoder()
        self.mlm_transform = DenseGeneral(cfg.d_model, ("embed", "mlp"), use_bias=True, dtype=dtype,
                                          param_dtype=param_dtype)
        self.mlm_norm = Norm(cfg.norm_type, cfg.norm_epsilon, dtype=dtype, param_dtype=param_dtype)
        self.mlm_bias = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                                   (cfg.vocab_size,), param_dtype)

    def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None,
               encoder_token_types=None, deterministic: bool = True):
        cfg = self.config
        positions = default_positions(encoder_input_tokens, encoder_positions)
        types = None
        if cfg.type_vocab_size:
            types = self.type_embed(encoder_input_tokens * 0 if encoder_token_types is None else encoder_token_types)
        x = self.embed(encoder_input_tokens, positions, deterministic, extra=types)
        if cfg.embedding_norm:
            x = self.embed_norm(x)
        x = self.dropout(x, deterministic)
        mask = make_encoder_mask(encoder_input_tokens, encoder_segment_ids)
        return self.encoder(x, mask, positions, deterministic=deterministic)

    def __call__(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None,
                 encoder_token_types=None, deterministic: bool = True, return_hidden: bool = False):
        """MLM logits, or with `return_hidden` the MLM head's input to the projection (fused loss)."""
        x = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions, encoder_token_types,
                        deterministic)
        x = self.mlm_norm(ACTIVATION_FNS[self.config.mlm_head_activation](self.mlm_transform(x)))
        return x if return_hidden else self.logits(x) + self.mlm_bias

    def output_head(self):
        return super().output_head()._replace(bias=self.mlm_bias)


@register(EncoderOnlyConfig)
@gin.configurable
class EncoderOnlyModel(BaseModel):
    """Masked-LM: predicts the encoder's own (masked) tokens."""

    network_cls = EncoderOnly
    required_features = ("encoder_input_tokens",)
    optional_features = ("encoder_segment_ids", "encoder_positions", "encoder_token_types")
    targets_feature = "encoder_target_tokens"
    weights_feature = "encoder_loss_weights"

    def __init__(self, config: EncoderOnlyConfig = gin.REQUIRED, lora: Optional[LoraConfig] = None,
                 weight_quantization: Optional[str] = None, quantize_embeddings: bool = False,
                 quantized_matmul: str = "dequantize"):
        super().__init__(config, lora, weight_quantization, quantize_embeddings, quantized_matmul)

    def feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        length = task_feature_lengths.get("inputs", task_feature_lengths.get("targets"))
        return dict.fromkeys(("encoder_input_tokens", "encoder_target_tokens", "encoder_loss_weights",
                              "encoder_segment_ids", "encoder_positions"), length)

    def flops_per_example(self, params, feature_lengths: Mapping[str, int]) -> float:
        cfg, length = self.config, feature_lengths["encoder_input_tokens"]
        flops = 6 * (matmul_params(params, cfg) + unembedding_params(cfg)) * length
        return float(flops + attention_flops(cfg, cfg.num_layers, length, length, causal=False))
