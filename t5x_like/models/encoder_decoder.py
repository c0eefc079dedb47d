"""T5-style encoder-decoder (v1.0 and v1.1 variants by config).

The network, and the model that owns its features, scoring, decoding and FLOPs (models/base.py).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from t5x_like.layers.attention import make_cross_mask, make_decoder_mask, make_encoder_mask
from t5x_like.layers.lora import LoraConfig
from t5x_like.models.base import BaseModel, DecodeStart, ModelCapabilityError
from t5x_like.models.config import EncoderDecoderConfig
from t5x_like.models.flops import attention_flops, matmul_params, unembedding_params
from t5x_like.models.network_base import NetworkBase, default_positions
from t5x_like.models.registry import register
from t5x_like.models.transformer import TransformerStack

EOS_ID = 1  # T5 inputs end with EOS


class EncoderDecoder(NetworkBase):
    config: EncoderDecoderConfig

    def setup(self):
        cfg = self.config
        self.setup_embeddings()
        self.encoder = TransformerStack(cfg, cfg.num_encoder_layers, causal=False)
        self.decoder = TransformerStack(cfg, cfg.num_decoder_layers, has_cross_attention=True, causal=True)

    def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None,
               deterministic: bool = True):
        positions = default_positions(encoder_input_tokens, encoder_positions)
        x = self.dropout(self.embed(encoder_input_tokens, positions, deterministic), deterministic)
        mask = make_encoder_mask(encoder_input_tokens, encoder_segment_ids)
        return self.encoder(x, mask, positions, deterministic=deterministic)

    def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
               encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None,
               deterministic: bool = True, return_hidden: bool = False):
        batch, length = decoder_input_tokens.shape
        positions = default_positions(decoder_input_tokens, decoder_positions)
        x = self.dropout(self.embed(decoder_input_tokens, positions, deterministic), deterministic)
        mask = make_decoder_mask(length, batch, decoder_target_tokens, decoder_segment_ids,
                                 positions=positions, sliding_window=self.config.sliding_window)
        query_tokens = (decoder_target_tokens if decoder_target_tokens is not None
                        else jnp.ones_like(decoder_input_tokens))
        cross_mask = make_cross_mask(query_tokens, encoder_input_tokens, decoder_segment_ids, encoder_segment_ids)
        x = self.decoder(x, mask, positions, encoded=encoded, cross_mask=cross_mask, deterministic=deterministic,
                         causal_mask=True)
        return x if return_hidden else self.logits(x)

    def decode_step(self, encoded, encoder_input_tokens, tokens, positions, decode_length: int,
                    fresh_cache: bool = False):
        """Decoder logits for a chunk of tokens per row through the self-attention KV cache (see
        DecoderOnly). Cross-attention keys / values of `encoded` are stored in the cache; with
        `encoded` None they are read from it (computed once per prompt)."""
        x = self.embed(tokens, jnp.maximum(positions, 0), True)
        cross_mask = make_cross_mask(jnp.ones_like(tokens), encoder_input_tokens)
        x = self.decoder(x, None, positions, encoded=encoded, cross_mask=cross_mask, decode=True,
                         decode_length=decode_length, fresh_cache=fresh_cache)
        return self.logits(x)

    def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
                 encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
                 decoder_positions=None, deterministic: bool = True, return_hidden: bool = False):
        """Logits, or with `return_hidden` the decoder output before the projection (fused loss)."""
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions, deterministic)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                           encoder_segment_ids, decoder_segment_ids, decoder_positions, deterministic,
                           return_hidden)


@register(EncoderDecoderConfig)
@gin.configurable
class EncoderDecoderModel(BaseModel):
    """Inputs go to the encoder, targets are decoded after the start id; the encoder and the
    cross-attention keys / values run once per decode (`prefill_cache`)."""

    network_cls = EncoderDecoder
    required_features = ("encoder_input_tokens", "decoder_input_tokens")
    optional_features = ("decoder_target_tokens", "encoder_segment_ids", "decoder_segment_ids",
                         "encoder_positions", "decoder_positions")
    can_decode = True
    can_prefill = True

    def __init__(self, config: EncoderDecoderConfig = gin.REQUIRED, lora: Optional[LoraConfig] = None,
                 weight_quantization: Optional[str] = None, quantize_embeddings: bool = False,
                 quantized_matmul: str = "dequantize"):
        super().__init__(config, lora, weight_quantization, quantize_embeddings, quantized_matmul)

    def feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        enc, dec = task_feature_lengths["inputs"], task_feature_lengths["targets"]
        return {**dict.fromkeys(("encoder_input_tokens", "encoder_segment_ids", "encoder_positions"), enc),
                **dict.fromkeys(("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                                 "decoder_segment_ids", "decoder_positions"), dec)}

    def feature_converter(self, task_features: Sequence[str], pack: bool = True):
        if set(task_features) != {"inputs", "targets"}:
            raise ModelCapabilityError(f"an encoder-decoder reads (inputs, targets) examples; this task has only "
                                       f"{list(task_features)}")
        return seqio.EncDecFeatureConverter(pack=pack)

    def scoring_batch(self, inputs, targets) -> dict:
        """Inputs to the encoder; targets decoded after the start id 0."""
        rows = len(targets)
        enc = np.zeros((rows, max(1, max(len(x) for x in inputs))), np.int32)
        dec_shape = (rows, max(1, max(len(t) for t in targets)))
        dec_in, dec_tgt = np.zeros(dec_shape, np.int32), np.zeros(dec_shape, np.int32)
        weights = np.zeros(dec_shape, np.float32)
        for i, (x, t) in enumerate(zip(inputs, targets)):
            enc[i, :len(x)] = x
            dec_tgt[i, :len(t)] = t
            dec_in[i, 1:len(t)] = t[:-1]
            weights[i, :len(t)] = 1
        return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in, "decoder_target_tokens": dec_tgt,
                "decoder_loss_weights": weights}

    def prompt_ids(self, ids, bos_id: Optional[int]) -> list[int]:
        return list(ids) + [EOS_ID]

    def prefill(self, params, prompts, prompt_lengths, *, beams: int = 1, decoder_start_id: int = 0) -> DecodeStart:
        """Encode the prompts once (padding is id 0); the decoder starts from `decoder_start_id`."""
        encoded = self.module.apply({"params": params}, prompts, method="encode")
        context = (jnp.repeat(encoded, beams, axis=0), jnp.repeat(prompts, beams, axis=0))
        batch = prompts.shape[0]
        return DecodeStart(context, jnp.full((batch, 1), decoder_start_id, jnp.int32), jnp.ones((batch,), jnp.int32))

    def init_cache(self, context, rows: int, length: int, kv_cache_dtype: Optional[str] = None,
                   window_slack: int = 0):
        encoded, enc_tokens = (jnp.zeros(x.shape, x.dtype) for x in context)
        tokens = jnp.zeros((rows, length), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(length), (rows, length))
        return self._zero_cache(lambda: self.module.init(jax.random.key(0), encoded, enc_tokens, tokens, positions,
                                                         length, method="decode_step"),
                                self._cache_slots(length, window_slack), kv_cache_dtype)

    def decode_chunk(self, params, cache, context, tokens, positions, length: int, fresh_cache: bool = False):
        """`context` (encoded, encoder tokens) computes and stores cross-attention keys / values;
        (None, encoder tokens), the `step_context`, reads the stored ones."""
        logits, mutated = self.module.apply({"params": params, "cache": cache}, *context, tokens, positions, length,
                                            fresh_cache, method="decode_step", mutable=["cache"])
        return logits, mutated["cache"]

    def step_context(self, context):
        return (None, context[1])

    def decode_logits(self, params, context, seq):
        return self.module.apply({"params": params}, *context, seq, method="decode")

    def flops_per_example(self, params, feature_lengths: Mapping[str, int]) -> float:
        """Encoder tokens against the encoder's params, decoder tokens against the decoder's and the logits."""
        cfg = self.config
        enc_len, dec_len = feature_lengths["encoder_input_tokens"], feature_lengths["decoder_input_tokens"]
        enc = matmul_params(params["encoder"], cfg)
        dec = matmul_params({k: v for k, v in params.items() if k != "encoder"}, cfg)
        flops = 6 * (enc * enc_len + (dec + unembedding_params(cfg)) * dec_len)
        flops += attention_flops(cfg, cfg.num_encoder_layers, enc_len, enc_len, causal=False)
        flops += attention_flops(cfg, cfg.num_decoder_layers, dec_len, dec_len, causal=True)
        flops += attention_flops(cfg, cfg.num_decoder_layers, dec_len, enc_len, causal=False)
        return float(flops)
