"""Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023).

Each round, for every row at once (one compiled `lax.while_loop`, rows at their own positions):
the draft proposes gamma tokens one by one from its own KV cache; the target scores the last
committed token and the gamma proposals in ONE `decode_chunk` pass (gamma + 1 logits); then

- sampling: proposal x_i is kept with probability min(1, p(x_i) / q(x_i)); at the first rejection a
  token is drawn from norm(max(0, p - q)), and if all gamma are kept a bonus token from p. The
  output then follows the target's distribution exactly (p and q after the same temperature /
  top-k / top-p processing as decoding.py);
- greedy: proposals are kept while they equal the target's argmax, then the target's argmax follows,
  so the output is the target's greedy output.

Both caches are rolled back (`rollback_cache`) to the kept length. The draft never wrote its last
proposal; when all gamma are kept it writes it with the next round's first token, as a chunk of 2
whose first slot is padding (position -1) otherwise. Only the model contract is used (`prefill`,
`init_cache`, `prefill_cache`, `decode_chunk`, `rollback_cache`), so decoder-only and
encoder-decoder models both work; the two models must share the vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.inference.decoding import DecodeResult, DecodingError, check_method, checked_prompts, process_logits
from t5x_like.models.base import BaseModel

METHODS = ("greedy", "sample")


@dataclasses.dataclass
class SpeculativeResult(DecodeResult):
    """DecodeResult (scores: the target's log-probability of the tokens) plus acceptance statistics:
    acceptance_rate = kept draft tokens / proposed ones; tokens_per_pass = tokens emitted per target
    forward pass (1 + kept); target_passes = verification rounds, summed over rows."""

    acceptance_rate: float = 0.0
    tokens_per_pass: float = 0.0
    target_passes: int = 0


def _choose(logits, keys, method, temperature, top_k, top_p):
    """(token [rows], processed log-probs [rows, V] or None) from logits [rows, V]."""
    if method == "greedy":
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    logp = jax.nn.log_softmax(process_logits(logits, temperature, top_k, top_p), axis=-1)
    return jax.vmap(jax.random.categorical)(keys, logp).astype(jnp.int32), logp


def _propose(draft, dparams, dctx, dcache, last, prev, need_prev, pos, keys, total, gamma, choose):
    """The draft's gamma proposals [rows, gamma] and their log-probs [rows, gamma, V] (or None)."""
    toks = jnp.stack([prev, last], axis=1)
    positions = jnp.stack([jnp.where(need_prev, pos - 1, -1), pos], axis=1)
    logits, dcache = draft.decode_chunk(dparams, dcache, dctx, toks, positions, total)
    first, first_lp = choose(logits[:, 1], keys[:, 0])

    def step(carry, i):
        cache, tok = carry
        logits, cache = draft.decode_chunk(dparams, cache, dctx, tok[:, None], (pos + i)[:, None], total)
        nxt, lp = choose(logits[:, 0], keys[:, i])
        return (cache, nxt), (nxt, lp)

    (dcache, _), (rest, rest_lp) = jax.lax.scan(step, (dcache, first), jnp.arange(1, gamma))
    drafts = jnp.concatenate([first[:, None], rest.T], axis=1)
    qlogp = None if first_lp is None else jnp.concatenate([first_lp[:, None], jnp.moveaxis(rest_lp, 0, 1)], axis=1)
    return drafts, qlogp, dcache


def _verify(plogits, drafts, qlogp, keys, method, temperature, top_k, top_p):
    """(kept n [rows], the token after the kept ones [rows]) by greedy matching or rejection sampling."""
    rows, gamma = drafts.shape
    if method == "greedy":
        best = jnp.argmax(plogits, axis=-1).astype(jnp.int32)  # [rows, gamma + 1]
        n = jnp.sum(jnp.cumprod(drafts == best[:, :gamma], axis=1), axis=1)
        return n, jnp.take_along_axis(best, n[:, None], axis=1)[:, 0]
    p = jax.nn.softmax(process_logits(plogits, temperature, top_k, top_p), axis=-1)
    q = jnp.exp(qlogp)
    pick = lambda a: jnp.take_along_axis(a[:, :gamma], drafts[:, :, None], axis=2)[..., 0]  # noqa: E731
    u = jax.vmap(lambda k: jax.random.uniform(k, (gamma,)))(keys[:, 0])
    n = jnp.sum(jnp.cumprod(u * pick(q) < pick(p), axis=1), axis=1)
    q_ext = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # all kept: the bonus draws from p
    at = lambda a: jnp.take_along_axis(a, n[:, None, None], axis=1)[:, 0]  # noqa: E731
    residual = jnp.maximum(at(p) - at(q_ext), 0.0)
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, at(p))  # p == q: draw from p
    token = jax.vmap(jax.random.categorical)(keys[:, 1], jnp.log(residual)).astype(jnp.int32)
    return n, token


@functools.partial(jax.jit, static_argnames=(
    "target", "draft", "gamma", "max_new_tokens", "method", "temperature", "top_k", "top_p", "eos_id",
    "decoder_start_id"))
def _speculate(tparams, dparams, prompts, lengths, rng, *, target, draft, gamma, max_new_tokens, method,
               temperature, top_k, top_p, eos_id, decoder_start_id):
    tstart = target.prefill(tparams, prompts, lengths, decoder_start_id=decoder_start_id)
    dstart = draft.prefill(dparams, prompts, lengths, decoder_start_id=decoder_start_id)
    prefix, plen = tstart.prefix, tstart.lengths
    rows = prefix.shape[0]
    total = prefix.shape[1] + max_new_tokens + gamma + 1
    tcache = target.init_cache(tstart.context, rows, total, window_slack=gamma + 1)
    tcache, tctx = target.prefill_cache(tparams, tcache, tstart.context, prefix, plen, total)
    dcache = draft.init_cache(dstart.context, rows, total, window_slack=gamma + 1)
    dcache, dctx = draft.prefill_cache(dparams, dcache, dstart.context, dstart.prefix, dstart.lengths, total)
    choose = functools.partial(_choose, method=method, temperature=temperature, top_k=top_k, top_p=top_p)
    width = max_new_tokens + gamma + 1
    row_ids = jnp.arange(rows)

    def cond(s):
        return ~jnp.all(s["done"])

    def body(s):
        keys = jax.vmap(lambda r: jax.random.split(jax.random.fold_in(jax.random.fold_in(rng, r), s["round"]),
                                                   gamma + 2))(row_ids)
        pos, done = s["pos"], s["done"]
        drafts, qlogp, dcache = _propose(draft, dparams, dctx, s["dcache"], s["last"], s["prev"], s["need_prev"],
                                         pos, keys[:, :gamma], total, gamma, choose)
        chunk = jnp.concatenate([s["last"][:, None], drafts], axis=1)
        plogits, tcache = target.decode_chunk(tparams, s["tcache"], tctx, chunk, pos[:, None] + jnp.arange(gamma + 1),
                                              total)
        n, token = _verify(plogits, drafts, qlogp, keys[:, gamma:], method, temperature, top_k, top_p)
        j = jnp.arange(gamma + 1)[None]
        emitted = jnp.where(j < n[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), token[:, None])
        logp = jnp.take_along_axis(jax.nn.log_softmax(plogits.astype(jnp.float32)), emitted[..., None], axis=2)[..., 0]
        live = (j <= n[:, None]) & ~done[:, None]
        idx = jnp.where(live, s["g"][:, None] + j, width)
        out = s["out"].at[row_ids[:, None], idx].set(emitted, mode="drop")
        out_lp = s["out_lp"].at[row_ids[:, None], idx].set(logp, mode="drop")
        g = s["g"] + jnp.where(done, 0, n + 1)
        hit_eos = jnp.any(live & (emitted == eos_id), axis=1)
        new_pos = jnp.where(done, pos, pos + n + 1)
        return dict(
            round=s["round"] + 1, out=out, out_lp=out_lp, g=g, done=done | hit_eos | (g >= max_new_tokens),
            tcache=target.rollback_cache(tcache, new_pos),
            dcache=draft.rollback_cache(dcache, jnp.minimum(new_pos, pos + gamma)),  # its last proposal unwritten
            last=jnp.where(done, s["last"], token), pos=new_pos,
            prev=jnp.where(done, s["prev"], drafts[:, -1]), need_prev=jnp.where(done, s["need_prev"], n == gamma),
            kept=s["kept"] + jnp.where(done, 0, n), passes=s["passes"] + (~done).astype(jnp.int32))

    zeros = jnp.zeros((rows,), jnp.int32)
    state = dict(round=jnp.int32(0), out=jnp.zeros((rows, width), jnp.int32), out_lp=jnp.zeros((rows, width)),
                 g=zeros, done=jnp.zeros((rows,), bool), tcache=tcache, dcache=dcache,
                 last=jnp.take_along_axis(prefix, (plen - 1)[:, None], axis=1)[:, 0], pos=plen - 1,
                 prev=zeros, need_prev=jnp.zeros((rows,), bool), kept=zeros, passes=zeros)
    s = jax.lax.while_loop(cond, body, state)
    tokens, out_lp = s["out"][:, :max_new_tokens], s["out_lp"][:, :max_new_tokens]
    is_eos = tokens == eos_id
    after_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
    gen_lengths = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens)
    scores = jnp.sum(jnp.where(after_eos, 0.0, out_lp), axis=1)
    return jnp.where(after_eos, 0, tokens), gen_lengths, scores, s["kept"], s["passes"]


def _check(target: BaseModel, draft: BaseModel, gamma: int, max_new_tokens: int, method: str, temperature: float):
    if not isinstance(gamma, (int, np.integer)) or gamma < 1:
        raise DecodingError(f"gamma={gamma!r} must be an integer >= 1 (draft tokens proposed per target pass)")
    check_method(method, METHODS, max_new_tokens, temperature)
    for role, m in (("target", target), ("draft", draft)):
        if not (m.can_decode and m.can_prefill):
            raise DecodingError(f"the {role} {type(m).__name__} cannot decode in chunks; speculative decoding needs "
                                "decoder-only or encoder-decoder models")
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise DecodingError(f"the draft's vocabulary ({dv} ids) differs from the target's ({tv}); use a draft "
                            "trained with the target's vocabulary")
    if type(target) is not type(draft):
        raise DecodingError(f"the draft is a {type(draft).__name__} and the target a {type(target).__name__}; "
                            "use a draft of the target's family")


def speculative_generate(target_model: BaseModel, target_variables, draft_model: BaseModel, draft_variables,
                         prompts, *, prompt_lengths=None, gamma: int = 4, max_new_tokens: int = 32,
                         method: str = "greedy", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                         eos_id: int = 1, decoder_start_id: int = 0, rng=None) -> SpeculativeResult:
    """`decoding.generate` for the target (same prompts, lengths, sampling knobs, EOS), sped up by a
    draft proposing `gamma` tokens per target pass. Greedy: the target's greedy tokens. Sample: the
    target's distribution (not its exact draws: the random stream differs)."""
    _check(target_model, draft_model, gamma, max_new_tokens, method, temperature)
    prompts, prompt_lengths = checked_prompts((target_model, draft_model), prompts, prompt_lengths, max_new_tokens)
    rng = jax.random.key(0) if rng is None else rng
    tokens, lengths, scores, kept, passes = _speculate(
        target_variables["params"], draft_variables["params"], jnp.asarray(prompts), jnp.asarray(prompt_lengths),
        rng, target=target_model, draft=draft_model, gamma=int(gamma), max_new_tokens=int(max_new_tokens),
        method=method, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), eos_id=int(eos_id),
        decoder_start_id=int(decoder_start_id))
    kept, passes = int(np.sum(kept)), int(np.sum(passes))
    return SpeculativeResult(np.asarray(tokens), np.asarray(lengths), np.asarray(scores),
                             acceptance_rate=kept / max(1, gamma * passes),
                             tokens_per_pass=(kept + passes) / max(1, passes), target_passes=passes)


def draft_config(config, overrides: Optional[Mapping] = None):
    """The target's `config` with the draft's `overrides` (field -> value; e.g. fewer layers, a smaller
    d_model, heads and mlp_dim): vocabulary, tokenizer and positions stay the target's. A field the
    config lacks is a DecodingError; a bad value the config's own ConfigError."""
    overrides = dict(overrides or {})
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise DecodingError(f"draft overrides {unknown} are not fields of {type(config).__name__}; use e.g. "
                            "num_layers, d_model, num_heads, num_kv_heads, head_dim, mlp_dim")
    if "vocab_size" in overrides and overrides["vocab_size"] != config.vocab_size:
        raise DecodingError(f"draft overrides change vocab_size ({config.vocab_size} -> {overrides['vocab_size']}); "
                            "a draft must share the target's vocabulary")
    return dataclasses.replace(config, **overrides)


@gin.configurable
def draft_model(target: BaseModel = gin.REQUIRED, overrides: Optional[Mapping] = None) -> BaseModel:
    """The draft a run trains (gin/runs/draft.gin: `MODEL = @draft_model()`): the target model's class
    with `draft_config(target.config, overrides)`; no LoRA, no quantization."""
    return type(target)(draft_config(target.config, overrides))


@gin.configurable
class SpeculativeDraft:
    """The draft the `infer` mode decodes with (gin: `infer.draft = @SpeculativeDraft()`): the target's
    own config with `config_overrides` (the DRAFT_OVERRIDES the draft was trained with, gin/runs/draft.gin;
    `num_layers` alone is a shorthand; neither: one layer), restored from `checkpoint`. Greedy and sampled
    requests then go through `speculative_generate`; the acceptance rate is logged."""

    def __init__(self, checkpoint: str = gin.REQUIRED, num_layers: Optional[int] = None, gamma: int = 4,
                 step: Optional[int] = None, config_overrides: Optional[Mapping] = None):
        overrides = dict(config_overrides or {})
        if num_layers is not None:
            if overrides.get("num_layers", num_layers) != num_layers:
                raise DecodingError(f"SpeculativeDraft.num_layers={num_layers} contradicts config_overrides' "
                                    f"num_layers={overrides['num_layers']}; set one of them")
            overrides["num_layers"] = num_layers
        self.overrides = overrides or {"num_layers": 1}
        self.checkpoint, self.gamma, self.step = checkpoint, gamma, step
        self.accepted = self.proposed = 0

    def model_for(self, target: BaseModel) -> BaseModel:
        """The draft model: the target's class and config, with the overrides."""
        return type(target)(draft_config(target.config, self.overrides))

    def load(self, target: BaseModel, variables=None):
        """(draft model, its variables): restored from `checkpoint` unless `variables` are given."""
        from t5x_like.training.checkpointing import restore_model_params

        model = self.model_for(target)
        if variables is None:
            variables = {"params": restore_model_params(self.checkpoint, model, step=self.step)}
        return model, variables

    def record(self, result: "SpeculativeResult") -> None:
        """Accumulate one batch's acceptance counts (gamma proposals per target pass)."""
        proposed = result.target_passes * self.gamma
        self.proposed += proposed
        self.accepted += result.acceptance_rate * proposed

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0
