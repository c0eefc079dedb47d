"""T5-style encoder-decoder network (v1.0 and v1.1 variants by config)."""

from __future__ import annotations

import jax.numpy as jnp

from t5x_like.layers.attention import make_cross_mask, make_decoder_mask, make_encoder_mask
from t5x_like.layers.transformer import TransformerStack
from t5x_like.models.config import EncoderDecoderConfig
from t5x_like.models.network_base import NetworkBase, default_positions


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

    def decode_step(self, encoded, encoder_input_tokens, tokens, positions, decode_length: int):
        """Decoder logits for one token per row through the self-attention KV cache (see DecoderOnly)."""
        x = self.embed(tokens, positions, True)
        cross_mask = make_cross_mask(jnp.ones_like(tokens), encoder_input_tokens)
        x = self.decoder(x, None, positions, encoded=encoded, cross_mask=cross_mask, decode=True,
                         decode_length=decode_length)
        return self.logits(x)

    def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
                 encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
                 decoder_positions=None, deterministic: bool = True, return_hidden: bool = False):
        """Logits, or with `return_hidden` the decoder output before the projection (fused loss)."""
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions, deterministic)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                           encoder_segment_ids, decoder_segment_ids, decoder_positions, deterministic,
                           return_hidden)
