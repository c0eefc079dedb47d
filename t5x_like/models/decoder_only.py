"""Decoder-only language model: GPT-2 style or LLaMA style by config; causal or prefix-LM."""

from __future__ import annotations

from t5x_like.layers.attention import make_decoder_mask
from t5x_like.layers.transformer import TransformerStack
from t5x_like.models.config import DecoderOnlyConfig
from t5x_like.models.network_base import NetworkBase, default_positions


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
        mask = make_decoder_mask(length, batch, decoder_target_tokens, decoder_segment_ids,
                                 decoder_causal_attention, positions, self.config.sliding_window)
        x = self.decoder(x, mask, positions, deterministic=deterministic,
                         causal_mask=decoder_causal_attention is None)
        return x if return_hidden else self.logits(x)

    def decode_step(self, tokens, positions, decode_length: int):
        """Logits for one token per row ([batch, 1] at `positions`) through the KV cache.

        Apply with mutable=["cache"]; initialising with full-length tokens allocates the cache.
        """
        x = self.embed(tokens, positions, True)
        x = self.decoder(x, None, positions, decode=True, decode_length=decode_length)
        return self.logits(x)
