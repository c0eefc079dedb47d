"""seqio preprocessors for the four pretraining objectives: span corruption, LM, prefix LM, MLM.

Each goes in a `seqio.Task` preprocessor list after `seqio.preprocessors.tokenize` (features with
`add_eos=False`): it receives one document of int32 ids per example in "targets", concatenates the
documents of its stream, cuts the stream into chunks and returns final examples whose features
already hold their EOS and fit `sequence_length`.

Randomness comes only from stateless TF ops seeded through `seqio.map_over_dataset(num_seeds=1)`:
`Task.get_dataset(seed=S)` runs the preprocessors under `seqio.utils.map_seed_manager(S)`, so a seed
fixes every noise mask, split point and masked position. Chunking itself is deterministic.

Chunks are cut from the concatenated stream so no token is lost or duplicated between them. seqio
repeats the source before these preprocessors, so a training stream (num_epochs=None) is endless
and only a finite one (num_epochs=1, e.g. validation) ends in a shorter final chunk. Empty
documents are dropped. Features other than "targets" describe documents, not chunks, and are
dropped.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import seqio
import tensorflow as tf

from t5x_like.data.corpus import CorpusError
from t5x_like.data.span_corruption import (corrupt_chunk, max_inputs_length, noise_counts,
                                           span_corruption_lengths)

__all__ = ["span_corruption", "span_corruption_lengths", "max_inputs_length", "next_token_lm",
           "document_lm", "prefix_lm", "masked_lm"]

Lengths = Optional[Mapping[str, int]]
Features = Mapping[str, Any]


def _length(sequence_length: Lengths, key: str, objective: str) -> int:
    if not sequence_length or sequence_length.get(key) is None:
        raise CorpusError(
            f"{objective} needs sequence_length['{key}'] to size its chunks, got "
            f"{sequence_length!r}. Pass task_feature_lengths (sequence_length) with a '{key}' entry.")
    return int(sequence_length[key])


def _vocabulary(output_features: Features, objective: str):
    if not output_features or "targets" not in output_features:
        raise CorpusError(f"{objective} reads the vocabulary of output_features['targets']; add a "
                          "'targets' seqio.Feature to the task.")
    return output_features["targets"].vocabulary


def _eos_id(vocabulary) -> int:
    return 1 if vocabulary.eos_id is None else int(vocabulary.eos_id)


def _token_stream_chunks(dataset: tf.data.Dataset, chunk_length: int,
                         eos_id: Optional[int] = None) -> tf.data.Dataset:
    """Concatenates the non-empty documents in "targets" (each followed by `eos_id` if given) and
    cuts the stream into int32 chunks of `chunk_length`; the last chunk keeps the remainder."""
    def doc_tokens(ex):
        tokens = tf.cast(ex["targets"], tf.int32)
        return tokens if eos_id is None else tf.concat([tokens, [eos_id]], axis=0)

    docs = dataset.filter(lambda ex: tf.size(ex["targets"]) > 0)
    return docs.map(doc_tokens).unbatch().batch(chunk_length)


# ------------------------------------------------------------------------------ span corruption


@seqio.map_over_dataset(num_seeds=1)
def _span_corrupt(chunk, seed, vocab_size, eos_id, noise_density, mean_noise_span_length):
    return corrupt_chunk(chunk, seed, vocab_size, eos_id, noise_density, mean_noise_span_length)


def span_corruption(dataset: tf.data.Dataset, sequence_length: Lengths, output_features: Features,
                    noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0) -> tf.data.Dataset:
    """T5 span corruption -> {"inputs", "targets"}, both ending in EOS.

    Documents are concatenated without separators and cut into chunks of the raw length T from
    `span_corruption_lengths(sequence_length["inputs"])`. Each noise span becomes one sentinel
    (span k -> vocab_size - 1 - k), so a length that needs more spans than the vocabulary has
    extra_ids is refused here, when the pipeline is built. The final, shorter chunk of a stream is
    noised with counts computed from its own length; a final single token cannot hold both a kept
    and a noise token and is dropped.
    """
    inputs_length = _length(sequence_length, "inputs", "span_corruption")
    raw_length, targets_length = span_corruption_lengths(
        inputs_length, noise_density, mean_noise_span_length)
    vocab = _vocabulary(output_features, "span_corruption")
    num_spans = noise_counts(raw_length, noise_density, mean_noise_span_length)[1]
    num_sentinels = int(vocab.extra_ids or 0)
    if num_spans > num_sentinels:
        limit = max_inputs_length(num_sentinels, noise_density, mean_noise_span_length)
        raise CorpusError(
            f"Span corruption with inputs length {inputs_length} needs {num_spans} noise spans "
            f"but the vocabulary has {num_sentinels} sentinel ids (extra_ids); use an inputs "
            f"length <= {limit} or a vocabulary with at least {num_spans} extra_ids.")
    inputs_feature = output_features.get("inputs")
    if inputs_feature is not None and inputs_feature.vocabulary.vocab_size != vocab.vocab_size:
        raise CorpusError(
            "Span corruption writes sentinels into the inputs, so 'inputs' and 'targets' need the "
            f"same vocabulary; got vocab sizes {inputs_feature.vocabulary.vocab_size} and "
            f"{vocab.vocab_size}.")
    given = sequence_length.get("targets")
    if given is not None and given < targets_length:
        raise CorpusError(
            f"Span corruption with inputs length {inputs_length} makes targets of "
            f"{targets_length} tokens but sequence_length['targets'] is {given}; set it to "
            f"{targets_length} (see span_corruption_lengths).")
    chunks = _token_stream_chunks(dataset, raw_length).filter(lambda c: tf.size(c) >= 2)
    return _span_corrupt(chunks, vocab_size=vocab.vocab_size, eos_id=_eos_id(vocab),
                         noise_density=noise_density,
                         mean_noise_span_length=mean_noise_span_length)


# -------------------------------------------------------------------------------- next-token LM


def next_token_lm(dataset: tf.data.Dataset, sequence_length: Lengths,
                  output_features: Features) -> tf.data.Dataset:
    """Decoder-only LM -> {"targets"}: the stream, each document followed by EOS, in chunks of
    exactly sequence_length["targets"] tokens (the stream's last chunk is shorter)."""
    length = _length(sequence_length, "targets", "next_token_lm")
    eos = _eos_id(_vocabulary(output_features, "next_token_lm"))
    return _token_stream_chunks(dataset, length, eos).map(lambda chunk: {"targets": chunk})


def document_lm(dataset: tf.data.Dataset, sequence_length: Lengths, output_features: Features,
                add_eos: bool = False) -> tf.data.Dataset:
    """Decoder-only LM, one document per row -> {"targets"}: as transformers scores a text.

    Each non-empty document's tokens (then EOS if `add_eos`, i.e. when the tokenizer's own
    `tokenizer(text)` appends one) are its own example, never joined to the next document; the
    converter (`tasks.LengthWeightedLMFeatureConverter`) feeds the tokenizer's BOS in front, so a
    row reads [BOS] + tokens and predicts every token. A document longer than
    sequence_length["targets"] is cut into consecutive pieces of that length, each read from a fresh
    BOS (every token is still predicted once, with less context than one long row would give).
    """
    length = _length(sequence_length, "targets", "document_lm")
    eos = _eos_id(_vocabulary(output_features, "document_lm")) if add_eos else None

    def doc_tokens(ex):
        tokens = tf.cast(ex["targets"], tf.int32)
        return tokens if eos is None else tf.concat([tokens, [eos]], axis=0)

    docs = dataset.filter(lambda ex: tf.size(ex["targets"]) > 0).map(doc_tokens)
    pieces = docs.flat_map(lambda tokens: tf.data.Dataset.from_tensor_slices(tokens).batch(length))
    return pieces.map(lambda piece: {"targets": piece})


# ------------------------------------------------------------------------------------ prefix LM


@seqio.map_over_dataset(num_seeds=1)
def _split_prefix(chunk, seed, max_inputs, max_targets):
    n = tf.size(chunk)
    lo = tf.maximum(1, n - max_targets)  # both parts non-empty and within their lengths
    hi = tf.minimum(n - 1, max_inputs)
    split = tf.random.stateless_uniform([], seed, lo, hi + 1, dtype=tf.int32)
    return {"inputs": chunk[:split], "targets": chunk[split:]}


def prefix_lm(dataset: tf.data.Dataset, sequence_length: Lengths,
              output_features: Features) -> tf.data.Dataset:
    """Prefix LM -> {"inputs": prefix, "targets": continuation}, for PrefixLMFeatureConverter.

    That converter concatenates the two (decoder length = inputs + targets) and puts the loss on
    the targets. The stream, each document followed by EOS, is cut into chunks of
    max(inputs, targets) tokens and each chunk is split at a uniformly random point that keeps both
    parts non-empty and within their lengths. With equal lengths any split is possible (as in T5);
    packing fills the rest of the decoder row. A final one-token chunk (always the stream's last
    EOS) cannot be split and is dropped.
    """
    inputs_length = _length(sequence_length, "inputs", "prefix_lm")
    targets_length = _length(sequence_length, "targets", "prefix_lm")
    if min(inputs_length, targets_length) < 1:
        raise CorpusError(f"prefix_lm needs inputs and targets lengths >= 1, got {inputs_length} "
                          f"and {targets_length}.")
    eos = _eos_id(_vocabulary(output_features, "prefix_lm"))
    chunks = _token_stream_chunks(dataset, max(inputs_length, targets_length), eos)
    chunks = chunks.filter(lambda c: tf.size(c) >= 2)
    return _split_prefix(chunks, max_inputs=inputs_length, max_targets=targets_length)


# ------------------------------------------------------------------------------------ masked LM


@seqio.map_over_dataset(num_seeds=1)
def _mask_tokens(chunk, seed, mask_rate, mask_id, first_regular, regular_end):
    select_seed, action_seed, token_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3))
    n = tf.size(chunk)
    eligible = tf.logical_and(chunk >= first_regular, chunk < regular_end)
    num_eligible = tf.reduce_sum(tf.cast(eligible, tf.int32))
    num_selected = tf.cast(tf.round(tf.cast(num_eligible, tf.float64) * mask_rate), tf.int32)
    num_selected = tf.minimum(tf.maximum(num_selected, 1), num_eligible)
    # A uniformly random subset of exactly num_selected eligible positions: rank random scores,
    # with ineligible positions sorted last.
    scores = tf.where(eligible, tf.random.stateless_uniform([n], select_seed), -1.0)
    rank = tf.math.invert_permutation(tf.argsort(scores, direction="DESCENDING"))
    selected = rank < num_selected
    action = tf.random.stateless_uniform([n], action_seed)
    random_tokens = tf.random.stateless_uniform([n], token_seed, first_regular, regular_end,
                                                dtype=tf.int32)
    inputs = tf.where(tf.logical_and(selected, action < 0.8), mask_id,
                      tf.where(tf.logical_and(selected, action < 0.9), random_tokens, chunk))
    return {"inputs": inputs, "targets": chunk}


def masked_lm(dataset: tf.data.Dataset, sequence_length: Lengths, output_features: Features,
              mask_rate: float = 0.15, mask_id: Optional[int] = None) -> tf.data.Dataset:
    """BERT masking -> {"inputs": corrupted chunk, "targets": original chunk}.

    The stream, each document followed by EOS, is cut into chunks of sequence_length["inputs"].
    round(mask_rate * n) of a chunk's n regular positions (not pad/EOS/UNK, not a sentinel) are
    selected; of those 80% become `mask_id` (default: the first sentinel, vocab_size - 1), 10% a
    uniformly random regular token and 10% stay. Note `seqio.EncoderFeatureConverter(mask_id=...)`
    puts loss only where the inputs hold `mask_id`, i.e. on the 80% part.
    """
    length = _length(sequence_length, "inputs", "masked_lm")
    given = sequence_length.get("targets")
    if given is not None and given < length:
        raise CorpusError(f"masked_lm targets are aligned with the inputs ({length} tokens) but "
                          f"sequence_length['targets'] is {given}; make them equal.")
    if not 0.0 < mask_rate < 1.0:
        raise CorpusError(f"mask_rate must be in (0, 1), got {mask_rate}.")
    vocab = _vocabulary(output_features, "masked_lm")
    extra_ids = int(vocab.extra_ids or 0)
    if mask_id is None:
        if extra_ids < 1:
            raise CorpusError("masked_lm uses the first sentinel as its mask token but the "
                              "vocabulary has no extra_ids; pass mask_id.")
        mask_id = vocab.vocab_size - 1
    if not 0 <= mask_id < vocab.vocab_size:
        raise CorpusError(f"mask_id {mask_id} is outside the vocabulary [0, {vocab.vocab_size}).")
    first_regular = 1 + max(i for i in (vocab.pad_id, vocab.eos_id, vocab.unk_id) if i is not None)
    regular_end = vocab.vocab_size - extra_ids
    if regular_end <= first_regular:
        raise CorpusError(f"masked_lm found no regular token ids in the vocabulary (ids "
                          f"{first_regular}..{regular_end - 1}).")
    chunks = _token_stream_chunks(dataset, length, _eos_id(vocab))
    return _mask_tokens(chunks, mask_rate=mask_rate, mask_id=mask_id, first_regular=first_regular,
                        regular_end=regular_end)
