"""What every objective reports: additive sums, and the one formula that turns them into metrics.

Steps, microbatches, hosts and eval batches all return dicts of sums over weighted target tokens,
so they add up before anything is divided (a mean of means would weight batches wrongly). Two
conventions make any objective's sums readable without a list of its keys:
- `tokens` is the total weight, the denominator of every per-token metric;
- every other key `k` (or `k_sum`) is reported as `k / tokens`, except `nll_sum` (-> `nll` and
  `perplexity`) and `correct` (-> `accuracy`).
Perplexity is exp(mean NLL per weighted target token), never including z-loss or label smoothing.
"""

from __future__ import annotations

import math
from typing import Mapping

# The sums the default cross-entropy objective returns ("loss" is the training objective's sum).
SUM_KEYS = ("loss", "nll_sum", "z_loss", "tokens", "correct")
# Sums evaluation keeps (no regularisers).
EVAL_SUM_KEYS = ("nll_sum", "tokens", "correct")


def perplexity(nll: float) -> float:
    """exp(nll), capped so that a diverged model reports a huge number rather than overflowing."""
    return math.exp(min(nll, 700.0))


def summarize(sums: Mapping[str, float]) -> dict:
    """Per-token metrics of a dict of sums (see the module docstring); `tokens` is kept as a count."""
    tokens = max(float(sums["tokens"]), 1.0)
    out = {}
    for key, value in sums.items():
        if key == "nll_sum":
            out["nll"] = float(value) / tokens
            out["perplexity"] = perplexity(out["nll"])
        elif key == "correct":
            out["accuracy"] = float(value) / tokens
        elif key != "tokens":
            out[key.removesuffix("_sum")] = float(value) / tokens
    out["tokens"] = float(sums["tokens"])
    return out
