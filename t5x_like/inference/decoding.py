"""Autoregressive decoding: greedy, temperature / top-k / top-p sampling and beam search.

The whole loop is one compiled `lax.while_loop` (it stops early once every row has emitted EOS
or, for beam search, once no row can improve). Each step feeds one token per row through the KV
cache (layers/kv_cache.py, Flax 'cache' collection); `use_cache=False` recomputes the full
sequence at every step instead, which is the reference the cache is tested against.

Prompts are right-padded, of any lengths. Prefill (the default, for models with `can_prefill`):
one forward pass writes every prompt but its last token into the cache at per-row positions
(padding skipped), and the loop starts at each row's last prompt token, at its own position: row
b's g-th generated token sits at position length_b + g. `prefill=False` keeps the old feed: prompt
tokens go through the loop one per step ("forced" decoding, as T5X does: at step t, a row whose
prompt is longer than t + 1 takes its next prompt token), the baseline of `benchmarks/decode.py`.
Both give each row what decoding it alone gives, token for token; sampling draws row r's g-th
token with key fold_in(fold_in(rng, r), g), so the two feeds also sample alike.
`kv_cache_dtype="int8"` stores the cache quantized; a sliding-window model keeps a ring buffer.

Decoder-only models: `prompts` are the decoder prefix (give the BOS id yourself if the model was
trained with one; the LM tasks of this project start with pad id 0). Encoder-decoder models:
`prompts` are the encoder inputs, and the decoder starts from `decoder_start_id` (0 for T5).

What depends on the model (its context, cache, one decode step, prompt checks) comes from the model
contract (models/base.py: `prefill`, `init_cache`, `decode_step`, `decode_logits`, `reorder_cache`).

Beam search follows Hugging Face's `generate(num_beams=..., do_sample=False)` step for step (2k
candidates per step, finished hypotheses scored `sum_logprob / generated_length ** length_penalty`,
`early_stopping` True / False / "never"), so the outputs are comparable token for token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.layers.kv_cache import KV_CACHE_DTYPES
from t5x_like.models.base import BaseModel
from t5x_like.errors import UserError

METHODS = ("greedy", "sample", "beam")
NEG = -1.0e9  # Hugging Face's "impossible" score offset; reused so tie-breaking matches


@dataclasses.dataclass
class DecodeResult:
    """tokens [batch, max_new_tokens]: generated ids, EOS included, pad 0 after it;
    lengths [batch]: generated tokens (EOS included); scores [batch]: sum of log-probabilities
    (beam search: the length-penalised score used to rank hypotheses)."""

    tokens: np.ndarray
    lengths: np.ndarray
    scores: np.ndarray


class DecodingError(UserError):
    """Bad decoding arguments; the message says which and what to use."""


# ---------------------------------------------------------------- logits processing


def process_logits(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Temperature, then top-k, then top-p (nucleus) filtering, in Hugging Face's order.

    Top-p keeps the smallest set of most likely tokens whose probability reaches top_p (the
    token that crosses the threshold is kept; at least one token always survives).
    """
    logits = logits.astype(jnp.float32) / jnp.float32(temperature)
    if top_k and top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p
        keep_sorted = keep_sorted.at[..., 0].set(True)
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


# ---------------------------------------------------------------- the model step


def _make_step(model: BaseModel, params, use_cache: bool, length: int, context, offsets=None):
    """step(aux, seq, t) -> (logits [rows, vocab] for the token after column t, aux). `offsets`
    [rows] (prefilled cache): column t of row r is position offsets[r] + t."""
    if offsets is not None:
        def step(cache, seq, t):
            tok = jax.lax.dynamic_slice_in_dim(seq, t, 1, axis=1)
            logits, cache = model.decode_chunk(params, cache, context, tok, (offsets + t)[:, None], length)
            return logits[:, 0], cache
    elif use_cache:
        def step(cache, seq, t):
            tok = jax.lax.dynamic_slice_in_dim(seq, t, 1, axis=1)
            return model.decode_step(params, cache, context, tok, jnp.full(tok.shape, t, jnp.int32), length)
    else:
        def step(aux, seq, t):
            logits = model.decode_logits(params, context, seq)
            return jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False), aux
    return step


# ---------------------------------------------------------------- greedy and sampling


def _sample_loop(step, aux, seq, lengths, max_new_tokens, eos_id, method, temperature, top_k, top_p, rng):
    rows, total = seq.shape
    last = lengths + max_new_tokens - 1  # index of each row's last allowed generated token

    def cond(state):
        t, _, done, *_ = state
        return (t < total - 1) & ~jnp.all(done)

    def body(state):
        t, seq, done, scores, aux = state
        logits, aux = step(aux, seq, t)
        if method == "greedy":
            chosen = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:  # row r's g-th generated token: key (r, g), whatever the feed
            keys = jax.vmap(lambda r, g: jax.random.fold_in(jax.random.fold_in(rng, r), g))(
                jnp.arange(rows), t + 1 - lengths)
            chosen = jax.vmap(jax.random.categorical)(keys, process_logits(logits, temperature, top_k, top_p))
            chosen = chosen.astype(jnp.int32)
        forced = t + 1 < lengths
        nxt = jnp.where(forced, seq[:, t + 1], jnp.where(done, 0, chosen))
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), chosen[:, None], axis=-1)[:, 0]
        scores = scores + jnp.where(forced | done, 0.0, logp)
        seq = jax.lax.dynamic_update_slice_in_dim(seq, nxt[:, None], t + 1, axis=1)
        done = done | (~forced & ((nxt == eos_id) | (t + 1 >= last)))
        return t + 1, seq, done, scores, aux

    state = (jnp.int32(0), seq, jnp.zeros((rows,), bool), jnp.zeros((rows,), jnp.float32), aux)
    _, seq, _, scores, _ = jax.lax.while_loop(cond, body, state)
    return seq, scores


# ---------------------------------------------------------------- beam search


def _beam_loop(step, aux, seq, lengths, max_new_tokens, eos_id, num_beams, length_penalty, early_stopping,
               reorder_cache):
    """Beam search over rows = batch * num_beams (beam-major within each batch row)."""
    rows, total = seq.shape
    batch, k = rows // num_beams, num_beams
    cand = 2 * k
    lengths_b = lengths.reshape(batch, k)[:, 0]
    run_seq = seq.reshape(batch, k, total)
    run_scores = jnp.tile(jnp.array([0.0] + [NEG] * (k - 1), jnp.float32), (batch, 1))
    fin_seq = run_seq
    fin_scores = jnp.full((batch, k), NEG, jnp.float32)
    fin_flags = jnp.zeros((batch, k), bool)
    unsatisfied = jnp.ones((batch,), bool)
    top_mask = jnp.arange(cand) < k

    def gather(x, idx):  # x [batch, n, ...], idx [batch, m]
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    def cond(state):
        t, *_, stop = state
        return (t < total - 1) & ~jnp.all(stop)

    def body(state):
        t, run_seq, run_scores, fin_seq, fin_scores, fin_flags, unsatisfied, aux, _ = state
        logits, aux = step(aux, run_seq.reshape(rows, total), t)
        vocab = logits.shape[-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, k, vocab)
        total_lp = (logp + run_scores[:, :, None]).reshape(batch, k * vocab)
        top_lp, top_idx = jax.lax.top_k(total_lp, cand)
        src_beam, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        top_seq = gather(run_seq, src_beam)
        top_seq = jax.lax.dynamic_update_slice_in_dim(top_seq, token[:, :, None], t + 1, axis=2)
        gen_len = (t + 2 - lengths_b).astype(jnp.float32)  # generated tokens, this one included
        hits = (token == eos_id) | ((t + 1) >= (lengths_b + max_new_tokens - 1))[:, None]

        # Running beams: the best k candidates that did not stop.
        run_lp = top_lp + hits.astype(jnp.float32) * NEG
        keep = jax.lax.top_k(run_lp, k)[1]
        new_run_seq, new_run_scores = gather(top_seq, keep), gather(run_lp, keep)
        new_src = gather(src_beam, keep)

        # Finished hypotheses: stopped candidates among the top k, length-penalised, merged.
        just_finished = hits & top_mask[None]
        fin_lp = top_lp / gen_len[:, None] ** length_penalty
        full = jnp.all(fin_flags, axis=1) & (early_stopping is True)
        fin_lp = fin_lp + full[:, None].astype(jnp.float32) * NEG
        fin_lp = fin_lp + (~unsatisfied)[:, None].astype(jnp.float32) * NEG
        fin_lp = fin_lp + (~just_finished).astype(jnp.float32) * NEG
        m_seq = jnp.concatenate([fin_seq, top_seq], axis=1)
        m_scores = jnp.concatenate([fin_scores, fin_lp], axis=1)
        m_flags = jnp.concatenate([fin_flags, just_finished], axis=1)
        best = jax.lax.top_k(m_scores, k)[1]
        new_fin_seq, new_fin_scores, new_fin_flags = gather(m_seq, best), gather(m_scores, best), gather(m_flags, best)

        # Can a running beam still beat the worst finished one?
        if early_stopping == "never" and length_penalty > 0.0:
            hyp_len = jnp.full((batch,), float(max_new_tokens))
        else:
            hyp_len = gen_len
        best_running = new_run_scores[:, 0] / hyp_len ** length_penalty
        worst = jnp.where(jnp.all(new_fin_flags, axis=1), jnp.min(new_fin_scores, axis=1), NEG)
        new_unsatisfied = unsatisfied & (best_running > worst)

        # Rows still reading their prompt take the prompt token on every beam and change nothing else.
        forced = t + 1 < lengths_b
        fb = forced[:, None]
        prompt_tok = run_seq[:, :, t + 1]
        forced_seq = jax.lax.dynamic_update_slice_in_dim(run_seq, prompt_tok[:, :, None], t + 1, axis=2)
        sel = lambda a, b: jnp.where(fb.reshape(fb.shape + (1,) * (a.ndim - 2)), a, b)  # noqa: E731
        run_seq = sel(forced_seq, new_run_seq)
        run_scores = sel(run_scores, new_run_scores)
        fin_seq = sel(fin_seq, new_fin_seq)
        fin_scores = sel(fin_scores, new_fin_scores)
        fin_flags = sel(fin_flags, new_fin_flags)
        unsatisfied = jnp.where(forced, unsatisfied, new_unsatisfied)
        src = jnp.where(fb, jnp.arange(k)[None], new_src)
        flat_src = (src + jnp.arange(batch)[:, None] * k).reshape(rows)
        aux = reorder_cache(aux, flat_src) if aux is not None else aux

        at_max = (t + 1) >= (lengths_b + max_new_tokens - 1)
        stop = ~forced & (~unsatisfied | (jnp.all(fin_flags, axis=1) & (early_stopping is True)) | at_max)
        return t + 1, run_seq, run_scores, fin_seq, fin_scores, fin_flags, unsatisfied, aux, stop

    state = (jnp.int32(0), run_seq, run_scores, fin_seq, fin_scores, fin_flags, unsatisfied, aux,
             jnp.zeros((batch,), bool))
    out = jax.lax.while_loop(cond, body, state)
    fin_seq, fin_scores = out[3], out[4]
    return fin_seq[:, 0], fin_scores[:, 0]


# ---------------------------------------------------------------- entry point


def _start(model, params, start, beams, max_new_tokens, use_cache, prefill, kv_cache_dtype):
    """(step, cache, seq [rows, columns], loop lengths [rows]) for the decoding loops."""
    prefix, lengths = start.prefix, start.lengths
    total = prefix.shape[1] + max_new_tokens
    seq = jnp.repeat(jnp.pad(prefix, ((0, 0), (0, max_new_tokens))), beams, axis=0)
    row_lengths = jnp.repeat(lengths, beams, axis=0)
    if not use_cache:
        return _make_step(model, params, False, total, start.context), None, seq, row_lengths
    kw = {} if kv_cache_dtype is None else {"kv_cache_dtype": kv_cache_dtype}
    cache = model.init_cache(start.context, seq.shape[0], total, **kw)
    if not prefill:
        return _make_step(model, params, True, total, start.context), cache, seq, row_lengths
    rows_prefix = jnp.repeat(prefix, beams, axis=0)
    cache, context = model.prefill_cache(params, cache, start.context, rows_prefix, row_lengths, total)
    last = jnp.take_along_axis(rows_prefix, (row_lengths - 1)[:, None], axis=1)
    seq = jnp.pad(last, ((0, 0), (0, max_new_tokens)))  # each row from its last prompt token on
    step = _make_step(model, params, True, total, context, offsets=row_lengths - 1)
    return step, cache, seq, jnp.ones_like(row_lengths)


@functools.partial(jax.jit, static_argnames=(
    "model", "max_new_tokens", "method", "temperature", "top_k", "top_p", "num_beams", "length_penalty",
    "early_stopping", "eos_id", "use_cache", "decoder_start_id", "prefill", "kv_cache_dtype"))
def _generate(params, prompts, lengths, rng, *, model, max_new_tokens, method, temperature, top_k, top_p,
              num_beams, length_penalty, early_stopping, eos_id, use_cache, decoder_start_id, prefill,
              kv_cache_dtype):
    beams = num_beams if method == "beam" else 1
    start = model.prefill(params, prompts, lengths, beams=beams, decoder_start_id=decoder_start_id)
    step, aux, seq, row_lengths = _start(model, params, start, beams, max_new_tokens, use_cache, prefill,
                                         kv_cache_dtype)
    total = seq.shape[1]
    lengths = row_lengths[::beams]
    if method == "beam":
        seq, scores = _beam_loop(step, aux, seq, row_lengths, max_new_tokens, eos_id, num_beams,
                                 length_penalty, early_stopping, model.reorder_cache)
    else:
        seq, scores = _sample_loop(step, aux, seq, row_lengths, max_new_tokens, eos_id, method,
                                   temperature, top_k, top_p, rng)
    # Each row's generated tokens start right after its prompt (its last token, when prefilled).
    idx = lengths[:, None] + jnp.arange(max_new_tokens)[None]
    tokens = jnp.take_along_axis(seq, jnp.minimum(idx, total - 1), axis=1)
    tokens = jnp.where(idx < total, tokens, 0)
    is_eos = tokens == eos_id
    after_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
    tokens = jnp.where(after_eos, 0, tokens)
    gen_lengths = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1,
                            jnp.minimum(max_new_tokens, total - lengths))
    return tokens, gen_lengths, scores


def check_method(method: str, methods, max_new_tokens: int, temperature: float) -> None:
    """The settings every decoding entry point shares: a known method, >= 1 new token, a positive
    sampling temperature."""
    if method not in methods:
        raise DecodingError(f"method={method!r}; use one of {methods}")
    if max_new_tokens < 1:
        raise DecodingError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if method == "sample" and not temperature > 0:
        raise DecodingError(f"temperature={temperature} must be > 0 (use method='greedy' for argmax)")


def checked_prompts(models, prompts, prompt_lengths, max_new_tokens: int):
    """(prompts, prompt_lengths) as int32 arrays (lengths default to the full width), checked against
    each of `models`: shape, maximum length and the model's own `check_prompts`."""
    prompts = np.asarray(prompts, np.int32)
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise DecodingError(f"prompts must be [batch, length >= 1], got shape {prompts.shape}")
    if prompt_lengths is None:
        prompt_lengths = np.full((prompts.shape[0],), prompts.shape[1], np.int32)
    prompt_lengths = np.asarray(prompt_lengths, np.int32)
    for model in models:
        limit = model.max_length()
        if limit is not None and int(prompt_lengths.max()) > limit:
            raise DecodingError(f"a prompt of {int(prompt_lengths.max())} tokens is longer than the model's maximum "
                                f"length {limit}; shorten it to at most {limit} tokens (minus max_new_tokens)")
        problem = model.check_prompts(prompts, prompt_lengths, max_new_tokens)
        if problem:
            raise DecodingError(problem)
    return prompts, prompt_lengths


def generate(model: BaseModel, variables, prompts, *, prompt_lengths=None, max_new_tokens: int = 32,
             method: str = "greedy", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_beams: int = 4, length_penalty: float = 1.0,
             early_stopping: Union[bool, str] = False, eos_id: int = 1, decoder_start_id: int = 0,
             rng=None, use_cache: bool = True, prefill: bool = True,
             kv_cache_dtype: Optional[str] = None) -> DecodeResult:
    """Decode up to max_new_tokens per row of `prompts` [batch, length] (right-padded int ids).

    prompt_lengths [batch]: real tokens per prompt (decoder-only; default: all of them, since
    0 may be a real BOS). Encoder-decoder prompts are encoder inputs padded with 0.
    method: "greedy", "sample" (temperature, top_k (0 = off), top_p (1 = off)) or "beam"
    (num_beams, length_penalty: score / length ** length_penalty, early_stopping as in HF).
    use_cache=False: recompute everything each step (the reference). prefill=False: feed prompts one
    token per step (the old path; models without `can_prefill` always do). kv_cache_dtype: None
    (the model's dtype) or "int8".
    """
    check_method(method, METHODS, max_new_tokens, temperature)
    if method == "beam" and num_beams < 1:
        raise DecodingError(f"num_beams={num_beams} must be at least 1")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise DecodingError(f"kv_cache_dtype={kv_cache_dtype!r}; use one of {KV_CACHE_DTYPES}")
    if early_stopping not in (True, False, "never"):
        raise DecodingError(f"early_stopping={early_stopping!r}; use True, False or 'never'")
    if not model.can_decode:
        raise DecodingError(f"{type(model).__name__} cannot generate: decoding needs a decoder-only or "
                            "encoder-decoder model")
    prompts, prompt_lengths = checked_prompts((model,), prompts, prompt_lengths, max_new_tokens)
    rng = jax.random.key(0) if rng is None else rng
    tokens, lengths, scores = _generate(
        variables["params"], jnp.asarray(prompts), jnp.asarray(prompt_lengths), rng, model=model,
        max_new_tokens=int(max_new_tokens), method=method, temperature=float(temperature), top_k=int(top_k),
        top_p=float(top_p), num_beams=int(num_beams), length_penalty=float(length_penalty),
        early_stopping=early_stopping, eos_id=int(eos_id), use_cache=bool(use_cache),
        decoder_start_id=int(decoder_start_id), prefill=bool(prefill and model.can_prefill),
        kv_cache_dtype=kv_cache_dtype)
    return DecodeResult(np.asarray(tokens), np.asarray(lengths), np.asarray(scores))
