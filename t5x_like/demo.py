"""A training-free tour: build each model family from gin, count parameters, run a forward pass."""

from __future__ import annotations

import time

import jax
import numpy as np

from t5x_like import gin_config

DEFAULT_MODEL_FILES = ("models/t5_1_1_tiny.gin", "models/gpt2_tiny.gin", "models/llama_tiny.gin",
                       "models/bert_tiny.gin")


def describe(gin_file: str, bindings=(), batch_size: int = 2, length: int = 64) -> dict:
    gin_config.parse([gin_file], bindings)
    model = gin_config.model_from_gin()
    variables = model.init_variables(jax.random.key(0))
    params = variables["params"]
    embed = int(np.prod(params["token_embed"]["embedding"].shape))
    batch = model.random_batch(batch_size, length)
    forward = jax.jit(model.compute_logits)
    logits = jax.block_until_ready(forward(variables, batch))  # compile
    start = time.perf_counter()
    logits = jax.block_until_ready(forward(variables, batch))
    seconds = time.perf_counter() - start
    if not np.all(np.isfinite(np.asarray(logits))):
        raise FloatingPointError(f"{gin_file}: non-finite logits")
    return {"model": gin_file, "family": type(model).__name__, "params": model.num_params(variables),
            "non_embedding": model.num_params(variables) - embed, "logits": tuple(logits.shape),
            "tokens_per_s": batch_size * length / seconds}


def run(gin_files=(), bindings=()) -> list[dict]:
    rows = [describe(f, bindings) for f in (gin_files or DEFAULT_MODEL_FILES)]
    print(f"{'model':32} {'family':22} {'params':>12} {'non-embed':>12} {'logits':>18} {'fwd tok/s':>10}")
    for r in rows:
        print(f"{r['model']:32} {r['family']:22} {r['params']:12,} {r['non_embedding']:12,} "
              f"{str(r['logits']):>18} {r['tokens_per_s']:10,.0f}")
    return rows
