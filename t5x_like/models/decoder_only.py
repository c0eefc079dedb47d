"""Decoder-only language model: GPT-2 style or LLaMA style by config; causal or prefix-LM.

The network, and the model that owns its features, scoring, decoding and FLOPs (models/base.py).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from t5x_like.layers.attention import make_decoder_mask
from t5x_like.layers.lora import LoraConfig
from t5x_like.models.base import BaseModel, DecodeStart
from t5x_like.models.config import DecoderOnlyConfig
from t5x_like.models.flops import attention_flops, matmul_params, unembedding_params
from t5x_like.models.network_base import NetworkBase, default_positions
from t5x_like.models.registry import register
from t5x_like.models.transformer import TransformerStack

DECODER_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights", "decoder_segment_ids",
                    "decoder_positions")


class SupervisedLMFeatureConverter(seqio.PrefixLMFeatureConverter):
    """Causal fine-tuning on (inputs, targets): each row is inputs then targets (packed, with
    segment ids), the loss only on targets, and the attention causal everywhere.

    seqio's prefix-LM converter also marks the inputs as mutually visible (decoder_causal_attention),
    which a causal model (GPT, LLaMA) never saw in pretraining nor sees when decoding; this drops it.
    """

    MODEL_FEATURES = {k: v for k, v in seqio.PrefixLMFeatureConverter.MODEL_FEATURES.items()
                      if k != "decoder_causal_attention"}

    def _convert_example(self, features):
        out = dict(super()._convert_example(features))
        out.pop("decoder_causal_attention")
        return out

    def get_model_feature_lengths(self, task_feature_lengths):
        lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
        lengths.pop("decoder_causal_attention")
        return lengths


class DecoderOnly(NetworkBase):
    config: DecoderOnlyConfig

    def setup(self):
        self.setup_embeddings()
        self.decoder = TransformerStack(self.config, self.config.num_layers, causal=True)

    def __call__(self, decoder_input_tokens, decoder_target_tokens=None, decoder_segment_ids=None,
                 decoder_positions=None, decoder_causal_attention=None, deterministic: bool = True,
                 return_hidden: bool = False):
        """decoder_causal_attention (prefix-LM): 1 on input positions, which see each other fully.
        `return_hidden`: the output before the logits projection (for the fused loss)."""
        batch, length = decoder_input_tokens.shape
        positions = default_positions(decoder_input_tokens, decoder_positions)
        x = self.dropout(self.embed(decoder_input_tokens, positions, deterministic), deterministic)
        # No padding mask from `decoder_target_tokens > 0`: id 0 is a real token for imported tokenizers
        # (Llama's <unk>, GPT-2's "!"). Rows are right-padded, so causality (and segment ids when
        # packed) already keep every real position from seeing padding; padding has zero loss weight.
        mask = make_decoder_mask(length, batch, None, decoder_segment_ids,
                                 decoder_causal_attention, positions, self.config.sliding_window)
        x = self.decoder(x, mask, positions, deterministic=deterministic,
                         causal_mask=decoder_causal_attention is None)
        return x if return_hidden else self.logits(x)

    def decode_step(self, tokens, positions, decode_length: int, fresh_cache: bool = False):
        """Logits for a chunk of tokens per row ([batch, k] at `positions`, -1: padding) through the
        KV cache. Apply with mutable=["cache"]; initialising with full-length tokens allocates it.
        """
        x = self.embed(tokens, jnp.maximum(positions, 0), True)
        x = self.decoder(x, None, positions, decode=True, decode_length=decode_length, fresh_cache=fresh_cache)
        return self.logits(x)


@register(DecoderOnlyConfig)
@gin.configurable
class DecoderOnlyModel(BaseModel):
    """Reads seqio's decoder features; prefills prompts into the KV cache of `decode_step` and decodes.

    Subclasses may swap `network_cls` for any network with the same call signature and a
    `decode_step(tokens, positions, decode_length)` that keeps its state in the 'cache' collection.
    """

    network_cls = DecoderOnly
    required_features = ("decoder_input_tokens",)
    optional_features = ("decoder_target_tokens", "decoder_segment_ids", "decoder_positions",
                         "decoder_causal_attention")
    can_decode = True
    can_prefill = True

    def __init__(self, config: DecoderOnlyConfig = gin.REQUIRED, lora: Optional[LoraConfig] = None,
                 weight_quantization: Optional[str] = None, quantize_embeddings: bool = False,
                 quantized_matmul: str = "dequantize"):
        super().__init__(config, lora, weight_quantization, quantize_embeddings, quantized_matmul)

    def feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        return dict.fromkeys(DECODER_FEATURES, task_feature_lengths.get("inputs", 0) + task_feature_lengths["targets"])

    def feature_converter(self, task_features: Sequence[str], pack: bool = True):
        """Targets alone: next-token LM. Inputs and targets: one causal row of inputs then targets
        with the loss on the targets (prefix-LM attention over the inputs is the `prefix_lm`
        objective's, for models pretrained that way)."""
        if "inputs" in task_features:
            return SupervisedLMFeatureConverter(pack=pack, loss_on_targets_only=True)
        return seqio.LMFeatureConverter(pack=pack)

    def scoring_batch(self, inputs, targets) -> dict:
        """The model reads input then target; only target tokens are weighted. An empty input scores
        the target from a leading 0, the BOS of this project's LM tasks."""
        seqs = [(list(x) if len(x) else [0]) + list(t) for x, t in zip(inputs, targets)]
        shape = (len(seqs), max(len(s) for s in seqs) - 1)
        dec_in, dec_tgt, weights = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.float32)
        for i, (s, t) in enumerate(zip(seqs, targets)):
            dec_in[i, :len(s) - 1] = s[:-1]
            dec_tgt[i, :len(s) - 1] = s[1:]
            weights[i, len(s) - 1 - len(t):len(s) - 1] = 1
        return {"decoder_input_tokens": dec_in, "decoder_target_tokens": dec_tgt, "decoder_loss_weights": weights}

    def prompt_ids(self, ids, bos_id: Optional[int]) -> list[int]:
        return ([bos_id] if bos_id is not None else []) + list(ids)

    def check_prompts(self, prompts, prompt_lengths, max_new_tokens: int) -> Optional[str]:
        if np.any(prompt_lengths < 1) or np.any(prompt_lengths > prompts.shape[1]):
            return f"prompt_lengths {prompt_lengths.tolist()} must be in [1, {prompts.shape[1]}]"
        cfg = self.config
        if getattr(cfg, "position_embedding", None) == "learned" and \
                prompts.shape[1] + max_new_tokens > cfg.max_position_embeddings:
            return (f"prompt length {prompts.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                    f"max_position_embeddings={cfg.max_position_embeddings}")
        return None

    def prefill(self, params, prompts, prompt_lengths, *, beams: int = 1, decoder_start_id: int = 0) -> DecodeStart:
        # No context: the prompt is the decoder prefix (`prefill_cache` writes it into the cache).
        return DecodeStart(None, prompts, prompt_lengths)

    def init_cache(self, context, rows: int, length: int, kv_cache_dtype: Optional[str] = None,
                   window_slack: int = 0):
        tokens = jnp.zeros((rows, length), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(length), (rows, length))
        return self._zero_cache(lambda: self.module.init(jax.random.key(0), tokens, positions, length,
                                                         method="decode_step"),
                                self._cache_slots(length, window_slack), kv_cache_dtype)

    def decode_chunk(self, params, cache, context, tokens, positions, length: int, fresh_cache: bool = False):
        logits, mutated = self.module.apply({"params": params, "cache": cache}, tokens, positions, length,
                                            fresh_cache, method="decode_step", mutable=["cache"])
        return logits, mutated["cache"]

    def decode_logits(self, params, context, seq):
        return self.module.apply({"params": params}, seq)

    def flops_per_example(self, params, feature_lengths: Mapping[str, int]) -> float:
        cfg, length = self.config, feature_lengths["decoder_input_tokens"]
        flops = 6 * (matmul_params(params, cfg) + unembedding_params(cfg)) * length
        return float(flops + attention_flops(cfg, cfg.num_layers, length, length, causal=True))
