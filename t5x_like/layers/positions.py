"""Relative position schemes: rotary embeddings (and HF's rope scaling) and T5's bucketed relative bias."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from t5x_like.errors import UserError


def apply_rotary(x, positions, theta: float = 10_000.0, scaling: Optional["RopeScaling"] = None):
    """Rotate feature pairs (i, i + d/2) of x [batch, length, heads, d] by position-dependent angles.

    This is the "rotate half" layout used by GPT-NeoX and Hugging Face LLaMA checkpoints. `scaling`
    (a `RopeScaling`) changes the frequencies, and YaRN also scales cos and sin, as HF does.
    """
    d = x.shape[-1]
    positions = jnp.asarray(positions, jnp.float32)
    inv_freq, factor = rotary_frequencies(d, positions, theta, scaling)
    angles = positions[..., None] * inv_freq  # [b, l, d/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    if factor != 1.0:
        sin, cos = sin * factor, cos * factor
    x32 = jnp.asarray(x, jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Rotary scaling: longer contexts from a model pretrained on shorter ones. The formulas are those
# of transformers' `modeling_rope_utils.py` (ROPE_INIT_FUNCTIONS), so scaled HF checkpoints import
# unchanged.

ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3")
_NEEDS_ORIGINAL_LENGTH = ("dynamic", "yarn", "llama3")


class RopeScalingError(UserError):
    """A rope_scaling setting that cannot work; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """One scaled-rotary scheme, with Hugging Face's `rope_parameters` names and defaults.

    rope_type: 'linear' (positions / factor), 'dynamic' (NTK-aware base growing with the sequence
        length beyond original_max_position_embeddings), 'yarn' (NTK-by-parts interpolation and an
        attention factor scaling cos/sin) or 'llama3' (Llama 3.1's wavelength-banded interpolation).
    original_max_position_embeddings: the pretraining length (dynamic: HF's max_position_embeddings).
    """

    rope_type: str
    factor: float
    original_max_position_embeddings: Optional[int] = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn: rotations below which a frequency is fully interpolated
    beta_slow: float = 1.0  # yarn: rotations above which it is kept (extrapolated)
    attention_factor: Optional[float] = None  # yarn: None is 0.1 ln(factor) + 1 (or the mscale ratio)
    mscale: Optional[float] = None  # yarn (DeepSeek): with mscale_all_dim, the attention factor's ratio
    mscale_all_dim: Optional[float] = None
    truncate: bool = True  # yarn: round the correction range to whole dimensions

    def __post_init__(self):
        name = f"rope_scaling rope_type={self.rope_type!r}"
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise RopeScalingError(f"{name} is not supported; use one of {', '.join(ROPE_SCALING_TYPES)}")
        if not (isinstance(self.factor, (int, float)) and self.factor > 0):
            raise RopeScalingError(f"{name}: factor={self.factor!r} must be a positive number (e.g. 4.0)")
        orig = self.original_max_position_embeddings
        if self.rope_type in _NEEDS_ORIGINAL_LENGTH and not (isinstance(orig, int) and orig > 0):
            raise RopeScalingError(f"{name} needs original_max_position_embeddings, the pretraining length "
                                   f"(a positive integer), got {orig!r}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise RopeScalingError(f"{name}: high_freq_factor={self.high_freq_factor} must exceed "
                                   f"low_freq_factor={self.low_freq_factor} (Llama 3.1: 4.0 and 1.0)")

    @classmethod
    def from_dict(cls, spec: dict) -> "RopeScaling":
        """From a {field: value} dict (a gin literal); unknown keys are named in the error."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(spec) - set(names))
        if unknown or "rope_type" not in spec or "factor" not in spec:
            raise RopeScalingError(f"rope_scaling {spec!r}: needs 'rope_type' and 'factor'"
                                   + (f" and has unknown keys {unknown}" if unknown else "")
                                   + f"; keys are {names}")
        return cls(**spec)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def rope_inv_freq(dim: int, theta: float, scaling: Optional[RopeScaling] = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies [dim / 2] (float64) and the factor scaling cos and sin, for static schemes.

    'dynamic' depends on the sequence length: this gives its frequencies up to the original length
    (the unscaled ones); `dynamic_inv_freq` gives them for a longer one.
    """
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    kind = scaling.rope_type if scaling is not None else "default"
    if kind in ("default", "dynamic"):
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling.factor, 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    return _yarn_inv_freq(dim, theta, scaling), _yarn_attention_factor(scaling)


def _llama3_inv_freq(inv_freq, s: RopeScaling):
    """Wavelengths above original / low_freq_factor are divided by factor, those below original /
    high_freq_factor kept, and the band between interpolated smoothly (Llama 3.1)."""
    orig = s.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = orig / s.low_freq_factor, orig / s.high_freq_factor
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def _yarn_inv_freq(dim, theta, s: RopeScaling):
    """NTK-by-parts: dimensions that turn fewer than beta_slow times over the original length are
    interpolated (divided by factor), more than beta_fast times kept, a linear ramp in between."""
    def correction_dim(rotations):
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    pos_freqs = theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    keep = 1.0 - ramp  # the extrapolation weight
    return (1.0 / (s.factor * pos_freqs)) * (1.0 - keep) + (1.0 / pos_freqs) * keep


def _yarn_attention_factor(s: RopeScaling) -> float:
    """YaRN's "mscale" multiplying cos and sin (so attention logits by its square)."""
    if s.attention_factor is not None:
        return float(s.attention_factor)

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.mscale and s.mscale_all_dim:
        return float(get_mscale(s.factor, s.mscale) / get_mscale(s.factor, s.mscale_all_dim))
    return get_mscale(s.factor)


def dynamic_inv_freq(dim: int, theta: float, scaling: RopeScaling, seq_len):
    """Dynamic NTK: the base grows as theta * (factor * L / original - (factor - 1))^(dim / (dim - 2))
    for a sequence length L = max(seq_len, original); seq_len may be traced (float32, as HF)."""
    orig = scaling.original_max_position_embeddings
    length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), orig)
    base = theta * (scaling.factor * length / orig - (scaling.factor - 1)) ** (dim / (dim - 2))
    return 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)


def rotary_frequencies(dim: int, positions, theta: float, scaling: Optional[RopeScaling] = None):
    """(inv_freq [dim / 2] float32, cos/sin factor) for rotating at `positions`.

    Dynamic NTK takes its sequence length as max(positions) + 1 over the whole batch, which is what
    transformers does for each forward pass. With a KV cache every key therefore keeps the rotation
    of the call that wrote it (a prefill chunk: its largest position + 1; a decoded token: its own
    position + 1), as in transformers, whose cache is never re-rotated either. So cached decoding
    equals transformers' for the same forward passes; `generate` prefills the whole prompt at once,
    where a prefill that leaves the last prompt token to the loop rotates the others at length P - 1.
    Each call stands alone: transformers also keeps the longest length seen by earlier calls.
    """
    if scaling is None:
        return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)), 1.0
    if scaling.rope_type == "dynamic":
        return dynamic_inv_freq(dim, theta, scaling, jnp.max(positions) + 1), 1.0
    inv_freq, factor = rope_inv_freq(dim, theta, scaling)
    return jnp.asarray(inv_freq, jnp.float32), factor


def relative_position_buckets(relative_position: np.ndarray, bidirectional: bool,
                              num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket ids for key_position - query_position, as in T5.

    Half of the buckets (all of them when causal) hold exact distances below num_buckets // 4
    (// 2 when causal); the rest grow logarithmically up to max_distance, beyond which distances
    share the last bucket. Bidirectional bucketing gives keys after the query the upper half.
    """
    rel = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        dist = np.abs(rel)
    else:
        dist = np.maximum(-rel, 0)
    max_exact = num_buckets // 2
    is_small = dist < max_exact
    with np.errstate(divide="ignore"):
        large = max_exact + (
            np.log(np.maximum(dist, 1).astype(np.float32) / max_exact)
            / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, dist, large)


class RelativePositionBias(nn.Module):
    """Per-head learned bias for each relative-position bucket, shared by all layers of a stack."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query_length: int, key_length: int, query_offset: int = 0):
        """Returns [1, heads, query_length, key_length]; lengths are static."""
        q = np.arange(query_offset, query_offset + query_length)[:, None]
        k = np.arange(key_length)[None, :]
        buckets = relative_position_buckets(k - q, self.bidirectional, self.num_buckets, self.max_distance)
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("relpos_buckets", "heads")),
            (self.num_buckets, self.num_heads), self.param_dtype)
        values = jnp.take(jnp.asarray(table, self.dtype), jnp.asarray(buckets), axis=0)  # [q, k, h]
        return jnp.transpose(values, (2, 0, 1))[None]
