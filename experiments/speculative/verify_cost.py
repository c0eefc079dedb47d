"""What one cached decode pass of k tokens per row costs, for the trained target and draft: a
speculative round is gamma draft passes of 1 token plus one target pass of gamma + 1, so the gain
depends on how much more a (gamma + 1)-token pass costs than a 1-token step.

    python experiments/speculative/verify_cost.py [--target_run runs/quickstart]
        [--draft_run runs/speculative_draft_distill] [--repeats 5]

Each figure: (time of 65 passes - time of 1 pass) / 64 inside one compiled loop (cache rolled back
each pass, as speculative decoding does), best of --repeats, interleaved.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from decode import _restore_run, validation_prompts  # noqa: E402

PROMPT, TOTAL = 16, 16 + 64 + 6


@functools.partial(jax.jit, static_argnames=("model", "k", "passes"))
def _passes(params, prompts, *, model, k, passes):
    rows = prompts.shape[0]
    start = model.prefill(params, prompts, jnp.full((rows,), PROMPT))
    cache = model.init_cache(start.context, rows, TOTAL, window_slack=6)
    cache, ctx = model.prefill_cache(params, cache, start.context, start.prefix, start.lengths, TOTAL)

    def body(i, carry):
        cache, token = carry
        positions = PROMPT - 1 + i % 10 + jnp.zeros((rows, 1), jnp.int32) + jnp.arange(k)
        logits, cache = model.decode_chunk(params, cache, ctx, jnp.broadcast_to(token[:, None], (rows, k)),
                                           positions, TOTAL)
        return model.rollback_cache(cache, positions[:, 0] + 1), jnp.argmax(logits[:, -1], -1).astype(jnp.int32)

    return jax.lax.fori_loop(0, passes, body, (cache, prompts[:, -1]))[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target_run", default="runs/quickstart")
    p.add_argument("--draft_run", default="runs/speculative_draft_distill")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    target, tvars, (task, lengths) = _restore_run(args.target_run)
    draft, dvars, _ = _restore_run(args.draft_run)
    prompts = jnp.asarray(validation_prompts(task, lengths, 4, PROMPT))
    cases = [(rows, name, model, v, k) for rows in (1, 4) for name, model, v in
             (("target", target, tvars), ("draft", draft, dvars)) for k in (1, 5)]
    best = {}
    for rep in range(args.repeats):
        for rows, name, model, v, k in cases:
            run = [functools.partial(_passes, v["params"], prompts[:rows], model=model, k=k, passes=n) for n in (1, 65)]
            if rep == 0:
                [jax.block_until_ready(f()) for f in run]  # compile
            seconds = []
            for f in run:
                t = time.perf_counter()
                jax.block_until_ready(f())
                seconds.append(time.perf_counter() - t)
            key = (rows, name, k)
            best[key] = min(best.get(key, float("inf")), (seconds[1] - seconds[0]) / 64 * 1000)
    for (rows, name, k), ms in sorted(best.items()):
        ratio = f" (x{ms / best[(rows, name, 1)]:.2f} a 1-token step)" if k > 1 else ""
        print(f"batch {rows} {name:6s} {k} token(s) per row: {ms:.3f} ms per pass{ratio}")


if __name__ == "__main__":
    main()
