"""The MFU a train step could reach if everything but its matmuls were free, on this machine.

    python benchmarks/matmul_bound.py [--dtype float32] [--family decoder_only]

Times, one at a time and in isolation, every matmul a training step of train_step.py's medium
model runs (forward, input gradient and weight gradient of each projection; the attention score
and value products with their gradients, per causal query block; the vocabulary projection in
the fused loss's chunks),
with the dimension numbers the step uses, and adds them up per step. The sum is a lower bound on
the step time; model FLOPs over it, against the square-matmul peak measured in the same process,
is an upper bound on MFU that no change outside the matmul library can beat.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as bench  # noqa: E402


def dense_dots(m: int, k: int, n: int):
    """The three products of y[m,n] = x[m,k] w[k,n]: forward, dx = dy w^T, dw = x^T dy."""
    return [((m, k), (k, n), (((1,), (0,)), ((), ()))),
            ((m, n), (k, n), (((1,), (1,)), ((), ()))),
            ((m, k), (m, n), (((0,), (0,)), ((), ())))]


def attention_dots(b: int, q_len: int, k_len: int, d: int):
    """Scores s = q k^T and out = p v over b = batch x heads, with the four gradients."""
    batch = ((0,), (0,))
    return [((b, q_len, d), (b, k_len, d), (((2,), (2,)), batch)),            # s = q k^T
            ((b, q_len, k_len), (b, k_len, d), (((2,), (1,)), batch)),        # out = p v
            ((b, q_len, d), (b, k_len, d), (((2,), (2,)), batch)),            # dp = dout v^T
            ((b, q_len, k_len), (b, q_len, d), (((1,), (1,)), batch)),        # dv = p^T dout
            ((b, q_len, k_len), (b, k_len, d), (((2,), (1,)), batch)),        # dq = ds k
            ((b, q_len, k_len), (b, q_len, d), (((1,), (1,)), batch))]        # dk = ds^T q


def causal_attention_dots(b: int, length: int, d: int, block: int):
    """Query block i against keys [0, (i + 1) * block), as layers/attention.py computes causal attention."""
    if not block or length % block or length <= block:
        return attention_dots(b, length, length, d)
    return [dot for end in range(block, length + 1, block) for dot in attention_dots(b, block, end, d)]


def step_dots(family: str):
    """(count, lhs shape, rhs shape, dimension numbers) of the medium model's training matmuls."""
    tokens, d, mlp, vocab = bench.BATCH * bench.SEQ, bench.D_MODEL, bench.MLP, bench.VOCAB
    if family != "decoder_only":
        raise SystemExit("only --family decoder_only is enumerated (LLaMA-style: SwiGLU, untied logits)")
    block = bench.medium_model(family, "float32").config.causal_query_block
    per_layer = [(4, dense_dots(tokens, d, d)), (2, dense_dots(tokens, d, mlp)), (1, dense_dots(tokens, mlp, d)),
                 (1, causal_attention_dots(bench.BATCH * bench.HEADS, bench.SEQ, d // bench.HEADS, block))]
    from t5x_like.objectives.fused_cross_entropy import chunk_length
    chunk = chunk_length(bench.SEQ, bench.BATCH, vocab)
    rows = bench.BATCH * chunk
    loss = [((rows, d), (d, vocab), (((1,), (0,)), ((), ()))),      # logits
            ((rows, vocab), (d, vocab), (((1,), (1,)), ((), ()))),  # dx
            ((rows, d), (rows, vocab), (((0,), (0,)), ((), ())))]   # dw
    out = [(count * bench.LAYERS, *dot) for count, dots in per_layer for dot in dots]
    return out + [(bench.SEQ // chunk, *dot) for dot in loss]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="decoder_only")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from t5x_like.training import matmul_peak

    dtype = jnp.dtype(args.dtype)
    total_s = total_flops = 0.0
    print(f"{'count':>5} {'lhs':>16} {'rhs':>16} {'contract':>12} {'ms each':>8} {'TFLOP/s':>8}")
    for count, lhs, rhs, dims in step_dots(args.family):
        a = jnp.ones(lhs, dtype)
        b = jnp.ones(rhs, dtype)
        f = jax.jit(lambda x, y, dims=dims: jax.lax.dot_general(x, y, dims, preferred_element_type=jnp.float32))
        seconds = bench.timed_steps(lambda: f(a, b).block_until_ready(), 3)
        out = jax.eval_shape(f, a, b).shape
        contracted = np.prod([lhs[i] for i in dims[0][0]])
        flops = 2.0 * np.prod(out) * contracted
        total_s += count * seconds
        total_flops += count * flops
        print(f"{count:>5} {str(lhs):>16} {str(rhs):>16} {str(dims[0]):>12} {seconds * 1e3:8.1f} "
              f"{flops / seconds / 1e12:8.3f}", flush=True)
    peak = matmul_peak.measure_matmul_peak(dtype, min_seconds=3.0)
    model = bench.medium_model(args.family, args.dtype)
    batch = bench.make_batch(args.family)
    params = jax.eval_shape(lambda: model.init_variables(jax.random.key(0), batch))["params"]
    model_flops = model.flops_per_example(params, {k: v.shape[1] for k, v in batch.items()})
    model_flops *= bench.BATCH
    print(f"matmuls alone: {total_s:.2f} s per step ({total_flops / 1e12:.3f} TFLOP executed, "
          f"{model_flops / 1e12:.3f} TFLOP counted by the MFU formula); square-matmul peak {peak / 1e12:.3f} TFLOP/s")
    print(f"RESULT matmul-only bound on {args.family} {args.dtype} MFU: {model_flops / total_s / peak:.1%}")


if __name__ == "__main__":
    main()
