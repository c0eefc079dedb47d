"""Flax Linen building blocks; every parameter carries logical axis names."""

from t5x_like.layers.attention import (MultiHeadAttention, make_cross_mask, make_decoder_mask,
                                       make_encoder_mask)
from t5x_like.layers.dense import DenseGeneral
from t5x_like.layers.embeddings import Embed, sinusoidal_positions
from t5x_like.layers.mlp import Mlp
from t5x_like.layers.moe import MoeMlp
from t5x_like.layers.norms import Norm
from t5x_like.layers.positions import RelativePositionBias, apply_rotary, relative_position_buckets
