"""Batched serving for the `infer` mode: length buckets, per-request limits, in-order streaming.

Why buckets: `decoding.generate` compiles once per (batch, prompt width, max_new_tokens). Serving
pads every batch to `batch_size` rows (padding rows repeat a real prompt and are dropped) and every
prompt to a power-of-two width (at least `min_width`), and rounds the batch's largest
max_new_tokens up to a power of two, so a file of prompts of any lengths compiles at most
(#width buckets x #new-token buckets) programs. Where the model's maximum length forbids a rounded
shape, the exact max_new_tokens, then the exact prompt length is used (the model's
`check_prompts` decides). Beam search keys batches by the exact max_new_tokens: a beam cut short
is not the beam search of the shorter limit.

Each request may carry (JSONL) `max_new_tokens` (a positive int; default: the mode's) and `stop`
(a string or a list of strings). The batch decodes to its bucket's limit; each row is then cut to
its own max_new_tokens (greedy and sampled tokens do not depend on the limit), then at the first
occurrence of any stop string in the decoded text. The stop string is excluded from "output", as
OpenAI's `stop` does (Hugging Face's `stop_strings` keeps it); "tokens" keeps the tokens up to the
one completing the stop string. "finish_reason" is "stop" (EOS or a stop string) or "length";
"score" is the sum of log-probabilities of the tokens kept, or null when a cut dropped tokens
after them (the decoder's score covered those too).

Streaming: requests are read lazily (at most `max_pending` read ahead of the oldest unfinished
one). The next batch is taken from the bucket of the oldest unfinished request, and results are
written (and flushed) as soon as every earlier request is written, so output is in input order.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterable, Optional

import numpy as np

from t5x_like.errors import UserError


class ServingError(UserError):
    """A bad request (its file:line is named) or serving setting."""


@dataclasses.dataclass
class Request:
    index: int                 # position in the input, 0-based
    where: str                 # "path:line", for error messages
    record: dict               # what is echoed back ("input")
    ids: list                  # prompt token ids as the model reads them
    max_new_tokens: int
    stop: tuple = ()


def request_options(rec: dict, where: str, default_max_new_tokens: int):
    """(max_new_tokens, stop strings) of one JSONL record, checked."""
    mnt = rec.get("max_new_tokens", default_max_new_tokens)
    if isinstance(mnt, bool) or not isinstance(mnt, int) or mnt < 1:
        raise ServingError(f"{where}: max_new_tokens={mnt!r} must be a positive integer")
    stop = rec.get("stop", ())
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise ServingError(f"{where}: stop={rec.get('stop')!r} must be a non-empty string or a list of them")
    return mnt, tuple(stop)


def pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def bucket_of(model, req: Request, min_width: int, exact_new: bool):
    """(prompt width, new tokens) the request's batch is decoded with (module docstring)."""
    n, mnt = len(req.ids), req.max_new_tokens
    limit = model.max_length()
    if limit is not None and n > limit:
        raise ServingError(f"{req.where}: a prompt of {n} tokens is longer than the model's maximum length "
                           f"{limit}; shorten it")
    width = pow2(max(n, min_width))
    if limit is not None:
        width = max(n, min(width, limit))
    new = mnt if exact_new else pow2(mnt)
    lengths = np.array([n], np.int32)
    for w, m in ((width, new), (width, mnt), (n, mnt)):
        if not model.check_prompts(np.zeros((1, w), np.int32), lengths, m):
            return w, m
    problem = model.check_prompts(np.zeros((1, n), np.int32), lengths, mnt)
    raise ServingError(f"{req.where}: {problem}; lower this request's max_new_tokens or shorten the prompt")


def finish(req: Request, tokens, length: int, score: float, eos_id: int, decode_text: Callable) -> dict:
    """One output record: the row cut to its max_new_tokens, then at its first stop string."""
    toks = [int(t) for t in tokens[:min(int(length), req.max_new_tokens)]]
    cut = len(toks) < int(length)
    hit_eos = bool(toks) and toks[-1] == eos_id
    toks = [t for t in toks if t != eos_id]
    text, reason = decode_text(toks), "stop" if hit_eos else "length"
    hits = [(text.find(s), s) for s in req.stop if s in text]
    if hits:
        pos = min(hits)[0]
        text, reason = text[:pos], "stop"
        keep = next(k for k in range(1, len(toks) + 1) if any(s in decode_text(toks[:k]) for s in req.stop))
        cut = cut or keep < len(toks) or hit_eos
        toks = toks[:keep]
    return {**req.record, "output": text, "tokens": toks, "score": None if cut else float(score),
            "finish_reason": reason}


def _batch_arrays(batch: list, width: int, batch_size: int):
    """Prompts [batch_size, width] right-padded with 0, lengths; padding rows repeat row 0."""
    rows = batch + [batch[0]] * (batch_size - len(batch))
    prompts = np.zeros((batch_size, width), np.int32)
    for i, r in enumerate(rows):
        prompts[i, :len(r.ids)] = r.ids
    return prompts, np.array([len(r.ids) for r in rows], np.int32)


def serve(requests: Iterable[Request], decode: Callable, write: Callable, *, model, batch_size: int,
          eos_id: int, decode_text: Callable, min_width: int = 16, exact_new: bool = False,
          max_pending: Optional[int] = None) -> int:
    """Decode every request in bucketed batches; write(record) in input order as soon as possible.

    decode(prompts [batch_size, width], lengths [batch_size], max_new_tokens) -> (tokens, lengths, scores).
    Returns the number of requests served.
    """
    if batch_size < 1 or min_width < 1:
        raise ServingError(f"batch_size={batch_size} and min_width={min_width} must be at least 1")
    max_pending = max_pending or 4 * batch_size
    queues: dict = collections.defaultdict(collections.deque)
    ready: dict = {}
    source, pending, exhausted, written = iter(requests), 0, False, 0
    while True:
        while not exhausted and pending < max_pending:
            req = next(source, None)
            if req is None:
                exhausted = True
            else:
                queues[bucket_of(model, req, min_width, exact_new)].append(req)
                pending += 1
        if not pending:
            return written
        key = min((q[0].index, k) for k, q in queues.items() if q)[1]
        width, bucket_new = key
        queue = queues[key]
        batch = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
        pending -= len(batch)
        prompts, lengths = _batch_arrays(batch, width, batch_size)
        tokens, gen_lengths, scores = decode(prompts, lengths, bucket_new)
        for i, req in enumerate(batch):
            ready[req.index] = finish(req, tokens[i], gen_lengths[i], scores[i], eos_id, decode_text)
        while written in ready:
            write(ready.pop(written))
            written += 1
