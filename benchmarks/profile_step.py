"""Where a train step's time goes: the jax profiler's per-op times, summed and ranked.

    python benchmarks/profile_step.py [--family decoder_only] [--dtype float32] [--top 25] [--trace_dir DIR]

Builds the same medium model and batch as train_step.py (no transformers needed), runs a few
profiled steps, and prints the XLA ops (thunks on CPU, kernels on accelerators) that took the
most time, with their share of the step. The raw trace stays in --trace_dir for TensorBoard or
Perfetto (perfetto_trace.json.gz). Also prints the compiled step's memory analysis.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import train_step as bench  # noqa: E402


def op_times(trace_dir: str) -> collections.Counter:
    """Microseconds per op name from the perfetto trace (complete events on device/XLA threads)."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            totals[e["name"]] += e["dur"]
    return totals


_DEF = re.compile(r"^(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]")


def _dims(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def dot_flops(hlo_text: str) -> dict[str, float]:
    """FLOPs of each dot (or fusion containing dots) in optimized HLO text, by instruction name.

    Written here because neither jax nor XLA exposes per-instruction costs of a compiled module.
    """
    comps: dict[str, list[str]] = {}
    current = None
    for raw in hlo_text.splitlines():
        line = raw.strip()
        if not raw.startswith(" ") and line.endswith("{"):
            m = re.match(r"^(?:ENTRY )?%([\w.\-]+)", line)
            current = m.group(1) if m else None
            comps[current] = []
        elif current is not None and line:
            comps[current].append(line)

    def flops_of(line: str, shapes: dict) -> float:
        out = _dims(_DEF.match(line).group(2))
        lhs = shapes[re.search(r" dot\(%([\w.\-]+),", line).group(1)]
        contracting = _dims(re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1))
        return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contracting)

    shapes = {name: {m.group(1): _dims(m.group(2)) for m in map(_DEF.match, lines) if m}
              for name, lines in comps.items()}
    result = {}
    for name, lines in comps.items():
        for line in lines:
            m = _DEF.match(line)
            if not m:
                continue
            if " dot(" in line:
                result[m.group(1)] = flops_of(line, shapes[name])
            called = re.search(r"calls=%([\w.\-]+)", line)
            if " fusion(" in line and called and called.group(1) in comps:
                inner = [flops_of(x, shapes[called.group(1)]) for x in comps[called.group(1)] if " dot(" in x]
                if inner:
                    result[m.group(1)] = sum(inner)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="decoder_only", choices=bench.FAMILIES)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace_dir", default=None)
    args = p.parse_args()

    import jax

    from t5x_like.training import matmul_peak
    from t5x_like.training import optimizers, steps as steps_lib
    from t5x_like.training.train_state import TrainState

    model = bench.medium_model(args.family, args.dtype)
    optimizer = optimizers.adamw(peak_learning_rate=1e-4, warmup_steps=10, decay_steps=1000)
    batch = jax.device_put(bench.make_batch(args.family))
    state = jax.jit(lambda rng: TrainState.create(model, optimizer, rng, batch))(jax.random.key(0))
    compiled = steps_lib.make_train_step(model, optimizer, dropout=False).lower(state, batch).compile()
    best = float("inf")
    for _ in range(args.steps + 1):  # the first also warms up
        start = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        best = min(best, time.perf_counter() - start)
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="t5x_like_trace_")
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
            state, m = compiled(state, batch)
            jax.block_until_ready(m)
    seconds = (time.perf_counter() - start) / args.steps
    lengths = {k: v.shape[1] for k, v in batch.items()}
    flops = model.flops_per_example(state.params, lengths) * bench.BATCH
    print(f"{args.family} {args.dtype}: {best:.2f} s/step (best of {args.steps}; {seconds:.2f} profiled), "
          f"model {flops / 1e12:.3f} TFLOP/step")
    print(compiled.memory_analysis())
    totals = op_times(trace_dir)
    dots = dot_flops(compiled.as_text())
    ops = {k: v for k, v in totals.items() if not k.startswith("$") and "::" not in k}
    by_kind: collections.Counter = collections.Counter()
    for name, us in ops.items():
        by_kind["matmul (dot)" if name in dots else re.sub(r"\.\d+$", "", name)] += us
    dot_us = sum(us for name, us in ops.items() if name in dots)
    dot_flops_step = sum(f for name, f in dots.items() if name in ops)  # executed ops only
    print(f"matmuls: {dot_flops_step / 1e12:.3f} TFLOP in {dot_us / 1e6 / args.steps:.2f} s/step "
          f"= {dot_flops_step * args.steps / max(dot_us, 1) / 1e3:.1f} GFLOP/s")
    step_us = seconds * 1e6 * args.steps
    print(f"{'op kind':40} {'ms/step':>9} {'share':>6}")
    for name, us in by_kind.most_common(12):
        print(f"{name[:40]:40} {us / 1e3 / args.steps:9.1f} {us / step_us:6.1%}")
    print(f"{'op':40} {'ms/step':>9} {'share':>6} {'GFLOP/s':>8}")
    for name, us in sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]:
        rate = f"{dots[name] * args.steps / us / 1e3:8.1f}" if name in dots else ""
        print(f"{name[:40]:40} {us / 1e3 / args.steps:9.1f} {us / step_us:6.1%} {rate}")
    print(f"trace: {trace_dir}")


if __name__ == "__main__":
    main()
