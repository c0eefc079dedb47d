"""T5 span corruption: the length arithmetic and the per-chunk noising transform.

Kept apart from the seqio plumbing in `preprocessors.py` so that the arithmetic (which decides chunk
sizes, target lengths and how many sentinels a run needs) can be read and tested on its own. The
graph code uses float64 and round-half-to-even, exactly like Python's `round`, so the counts
computed here for a chunk length are the counts the TF graph applies to it.
"""

from __future__ import annotations

import tensorflow as tf

from t5x_like.data.corpus import CorpusError

MIN_INPUTS_LENGTH = 3  # one kept token, one sentinel, EOS


def _check_rates(noise_density: float, mean_noise_span_length: float) -> None:
    if not 0.0 < noise_density < 1.0:
        raise CorpusError(f"noise_density must be in (0, 1), got {noise_density}.")
    if mean_noise_span_length < 1.0:
        raise CorpusError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}.")


def noise_counts(length: int, noise_density: float = 0.15,
                 mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(noise tokens N, noise spans S) for a chunk of `length` >= 2 tokens.

    N = round(density * length) clipped to [1, length - 1] (at least one token noised, one kept);
    S = max(1, round(N / mean)), never more than the kept tokens, since every noise span needs a
    non-noise segment before it.
    """
    num_noise = min(max(1, round(noise_density * length)), length - 1)
    num_spans = max(1, round(num_noise / mean_noise_span_length))
    return num_noise, min(num_spans, length - num_noise)


def _inputs_length(raw_length: int, noise_density: float, mean_noise_span_length: float) -> int:
    n, s = noise_counts(raw_length, noise_density, mean_noise_span_length)
    return raw_length - n + s + 1  # kept tokens + one sentinel per span + EOS


def span_corruption_lengths(inputs_length: int, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """Returns (raw chunk length T, targets length) for an inputs length, e.g. 512 -> (568, 114).

    T is the largest raw length whose corrupted inputs, (T - N) + S + 1, fit in `inputs_length`;
    the targets hold N + S + 1 tokens. Both are non-decreasing in T, so a shorter (final) chunk
    fits as well.
    """
    _check_rates(noise_density, mean_noise_span_length)
    if inputs_length < MIN_INPUTS_LENGTH:
        raise CorpusError(
            f"Span corruption needs an inputs length of at least {MIN_INPUTS_LENGTH} (a kept "
            f"token, a sentinel and EOS), got {inputs_length}. Use a longer inputs length.")
    raw = 2
    while _inputs_length(raw + 1, noise_density, mean_noise_span_length) <= inputs_length:
        raw += 1
    n, s = noise_counts(raw, noise_density, mean_noise_span_length)
    return raw, n + s + 1


def max_inputs_length(num_sentinels: int, noise_density: float = 0.15,
                      mean_noise_span_length: float = 3.0) -> int:
    """Largest inputs length whose chunks need at most `num_sentinels` noise spans.

    With 100 sentinels and the T5 defaults this is 1809: a raw chunk of 2010 tokens has 302 noise
    tokens in 101 spans and corrupts to 1810 inputs tokens.
    """
    _check_rates(noise_density, mean_noise_span_length)
    if num_sentinels < 1:
        return 0
    raw = 2  # find the smallest raw length that needs more spans than there are sentinels
    while noise_counts(raw, noise_density, mean_noise_span_length)[1] <= num_sentinels:
        raw += 1
    return _inputs_length(raw, noise_density, mean_noise_span_length) - 1


def _noise_counts_tf(length, noise_density, mean_noise_span_length):
    """Graph version of `noise_counts` (float64, round half to even, as Python's `round`)."""
    num_noise = tf.cast(tf.round(tf.cast(length, tf.float64) * noise_density), tf.int32)
    num_noise = tf.clip_by_value(num_noise, 1, length - 1)
    num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float64) / mean_noise_span_length),
                        tf.int32)
    num_spans = tf.minimum(tf.maximum(num_spans, 1), length - num_noise)
    return num_noise, num_spans


def _random_segmentation(num_items, num_segments, seed):
    """Lengths (each >= 1, summing to num_items) of a uniformly random split into segments.

    Picks num_segments - 1 distinct cut points among the num_items - 1 gaps.
    """
    scores = tf.random.stateless_uniform([num_items - 1], seed)
    cuts = tf.sort(tf.argsort(scores)[:num_segments - 1] + 1)
    bounds = tf.concat([[0], cuts, [num_items]], axis=0)
    return bounds[1:] - bounds[:-1]


def random_spans_noise_mask(length, seed, noise_density=0.15, mean_noise_span_length=3.0):
    """Noise mask of a chunk: S pairs of (non-noise, noise) segments, each segment non-empty.

    Args:
        length: int32 scalar >= 2, the chunk length.
        seed: shape [2] stateless seed.
        noise_density: fraction of tokens to noise.
        mean_noise_span_length: average noise span length.

    Returns:
        (is_noise, span_index, is_segment_start), each of shape [length]. span_index k is the
        pair a position belongs to; noise span k gets the sentinel vocab_size - 1 - k.
    """
    num_noise, num_spans = _noise_counts_tf(length, noise_density, mean_noise_span_length)
    noise_seed, keep_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    noise_lengths = _random_segmentation(num_noise, num_spans, noise_seed)
    keep_lengths = _random_segmentation(length - num_noise, num_spans, keep_seed)
    # Segments alternate kept, noise, kept, noise, ...: a chunk starts kept and ends noised.
    segment_lengths = tf.reshape(tf.stack([keep_lengths, noise_lengths], axis=1), [-1])
    ends = tf.cumsum(segment_lengths)
    positions = tf.range(length)
    segment = tf.searchsorted(ends, positions, side="right")
    is_start = tf.equal(tf.gather(ends - segment_lengths, segment), positions)
    return tf.equal(segment % 2, 1), segment // 2, is_start


def corrupt_chunk(tokens, seed, vocab_size, eos_id=1, noise_density=0.15,
                  mean_noise_span_length=3.0):
    """Span-corrupts one chunk of >= 2 int32 tokens into {"inputs", "targets"}.

    inputs: the kept tokens with each noise span replaced by its sentinel, then EOS.
    targets: for each noise span its sentinel then its tokens, then EOS.
    """
    tokens = tf.cast(tokens, tf.int32)
    is_noise, span, is_start = random_spans_noise_mask(
        tf.size(tokens), seed, noise_density, mean_noise_span_length)
    sentinel = vocab_size - 1 - span
    opens_span = tf.logical_and(is_noise, is_start)
    inputs = tf.boolean_mask(tf.where(opens_span, sentinel, tokens),
                             tf.logical_or(tf.logical_not(is_noise), opens_span))
    # Interleave [sentinel, token] per position; keep the sentinel where a span opens and the
    # token wherever there is noise.
    targets = tf.boolean_mask(tf.reshape(tf.stack([sentinel, tokens], axis=1), [-1]),
                              tf.reshape(tf.stack([opens_span, is_noise], axis=1), [-1]))
    eos = tf.constant([eos_id], tf.int32)
    return {"inputs": tf.concat([inputs, eos], 0), "targets": tf.concat([targets, eos], 0)}
