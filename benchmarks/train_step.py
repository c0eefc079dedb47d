"""Train-step speed per model family: t5x_like (JAX) against Hugging Face transformers (PyTorch, CPU).

    python benchmarks/train_step.py [--families decoder_only,encoder_decoder,encoder_only,moe]
                                    [--dtypes float32,bfloat16] [--steps 3] [--frameworks t5x_like,transformers]

Each family is built once in transformers from a config with random weights (d_model 512, 8 heads,
6 layers (6 + 6 for the encoder-decoder), MLP 2048, vocab 32768, batch 8, sequence 512; the
encoder-decoder decodes 128 targets, span corruption's ratio) and imported into t5x_like, so both
frameworks train the same architecture from the same weights with AdamW (clip 1.0, decay 0.1) on
the same random batch. Every (framework, family, dtype) runs in its own subprocess, so the peak
resident memory (ru_maxrss) belongs to that run alone and thread pools never overlap.

Reported per run: step seconds (best of --steps after one warm-up step), tokens/s (all input
tokens, encoder + decoder), model TFLOP/s (DESIGN.md's formula, counted from the t5x_like params),
MFU against the float32 (or bfloat16) matmul peak measured in that process, and peak RSS. The last
line gives decoder-only float32 MFU against the 70% target and the worst t5x_like / transformers
tokens/s ratio against the 1.5x target.

MoE: t5x_like runs twice, dropless (its default: tokens sorted by expert through grouped matmuls,
none dropped, exactly the work Mixtral in transformers does) and `t5x_like_capacity` (GShard/Switch
one-hot dispatch with capacity factor 1.25, tokens past capacity dropped); the summary line gives
dropless / capacity tokens/s. One caveat: bfloat16 means bfloat16 activations with float32 params in both (torch.autocast on the PyTorch side).
The FLOP count includes the vocabulary projection at every position, as transformers computes it;
t5x_like's fused loss projects only the weighted ones (the encoder-only MLM batch weights 15%), so
its encoder-only TFLOP/s and MFU count work it skipped and can pass the matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

try:
    from t5x_like.runtime import host_runtime
except ImportError:  # an older checkout being measured for a before/after comparison
    host_runtime = None

FAMILIES = ("decoder_only", "encoder_decoder", "encoder_only", "moe")
D_MODEL, HEADS, LAYERS, MLP, VOCAB, BATCH, SEQ, DEC_SEQ = 512, 8, 6, 2048, 32768, 8, 512, 128
EXPERTS, TOP_K, CAPACITY = 8, 2, 1.25
CAPACITY_ROW = "t5x_like_capacity"   # the MoE family's second t5x_like row: capacity-factor dispatch


def hf_config(family: str):
    import transformers

    common = dict(vocab_size=VOCAB, num_attention_heads=HEADS)
    if family == "decoder_only":
        return transformers.LlamaConfig(hidden_size=D_MODEL, intermediate_size=MLP, num_hidden_layers=LAYERS,
                                        num_key_value_heads=HEADS, max_position_embeddings=SEQ, **common)
    if family == "moe":
        return transformers.MixtralConfig(hidden_size=D_MODEL, intermediate_size=MLP, num_hidden_layers=LAYERS,
                                          num_key_value_heads=HEADS, max_position_embeddings=SEQ,
                                          num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                          sliding_window=None, **common)
    if family == "encoder_only":
        return transformers.BertConfig(hidden_size=D_MODEL, intermediate_size=MLP, num_hidden_layers=LAYERS,
                                       max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0, **common)
    if family == "encoder_decoder":
        return transformers.T5Config(vocab_size=VOCAB, d_model=D_MODEL, d_kv=D_MODEL // HEADS, d_ff=MLP,
                                     num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=HEADS,
                                     feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                                     decoder_start_token_id=0, pad_token_id=0)
    raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")


def hf_model_class(family: str):
    import transformers

    return {"decoder_only": transformers.LlamaForCausalLM, "moe": transformers.MixtralForCausalLM,
            "encoder_only": transformers.BertForMaskedLM,
            "encoder_decoder": transformers.T5ForConditionalGeneration}[family]


def make_batch(family: str, seed: int = 0) -> dict:
    """Random full rows (no padding) in seqio feature names; MLM predicts 15% of positions."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = lambda n: rng.integers(2, VOCAB, (BATCH, n)).astype(np.int32)  # noqa: E731
    if family in ("decoder_only", "moe"):
        seq = tokens(SEQ + 1)
        return {"decoder_input_tokens": seq[:, :-1], "decoder_target_tokens": seq[:, 1:],
                "decoder_loss_weights": np.ones((BATCH, SEQ), np.float32)}
    if family == "encoder_only":
        targets = tokens(SEQ)
        weights = (rng.random((BATCH, SEQ)) < 0.15).astype(np.float32)
        return {"encoder_input_tokens": np.where(weights > 0, 3, targets).astype(np.int32),
                "encoder_target_tokens": targets, "encoder_loss_weights": weights}
    targets = tokens(DEC_SEQ)
    return {"encoder_input_tokens": tokens(SEQ), "decoder_target_tokens": targets,
            "decoder_input_tokens": np.concatenate([np.zeros((BATCH, 1), np.int32), targets[:, :-1]], axis=1),
            "decoder_loss_weights": np.ones((BATCH, DEC_SEQ), np.float32)}


def medium_model(family: str, dtype: str):
    """The medium config train_step.py imports from transformers, built directly."""
    from t5x_like import models as base
    from t5x_like.models.config import DecoderOnlyConfig, EncoderDecoderConfig, EncoderOnlyConfig

    common = dict(vocab_size=VOCAB, d_model=D_MODEL, num_heads=HEADS, head_dim=D_MODEL // HEADS,
                  mlp_dim=MLP, dtype=dtype)
    if family in ("decoder_only", "moe"):
        moe = dict(num_experts=EXPERTS, moe_top_k=TOP_K, moe_capacity_factor=CAPACITY) \
            if family == "moe" else {}
        cfg = DecoderOnlyConfig(num_layers=LAYERS, mlp_activations=("silu", "linear"), position_embedding="rotary",
                                tie_embeddings=False, norm_epsilon=1e-6, **moe, **common)
    elif family == "encoder_only":
        cfg = EncoderOnlyConfig(num_layers=LAYERS, mlp_activations=("gelu",), position_embedding="learned",
                                norm_type="layer", norm_position="post", use_bias=True, **common)
    else:
        cfg = EncoderDecoderConfig(num_encoder_layers=LAYERS, num_decoder_layers=LAYERS,
                                   mlp_activations=("gelu_tanh", "linear"), tie_embeddings=False, **common)
    return base.model_for_config(cfg)


def tokens_per_step(batch: dict) -> int:
    return sum(v.size for k, v in batch.items() if k.endswith("input_tokens"))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def timed_steps(step, steps: int) -> float:
    step()  # warm-up (compilation, first allocations)
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def run_t5x_like(family: str, dtype: str, checkpoint: str, steps: int, moe_impl: str = "dropless") -> dict:
    import jax

    from t5x_like.interop import hf
    from t5x_like.training import matmul_peak
    from t5x_like.training import optimizers, steps as steps_lib
    from t5x_like.training.train_state import TrainState

    overrides = {"dtype": dtype}
    if family == "moe":
        overrides["moe_impl"] = moe_impl
        if moe_impl == "capacity":
            overrides["moe_capacity_factor"] = CAPACITY
    model, variables = hf.load(checkpoint, **overrides)
    optimizer = optimizers.adamw(peak_learning_rate=1e-4, warmup_steps=10, decay_steps=1000)
    state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=variables["params"],
                       opt_state=optimizer.init(variables["params"]),
                       rng=jax.random.key_data(jax.random.key(0)))
    batch = jax.device_put(make_batch(family))
    step_fn = steps_lib.make_train_step(model, optimizer, dropout=False)
    compiled = step_fn.lower(state, batch).compile()
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])
        holder["loss"] = float(metrics["loss"])
        holder.setdefault("first_loss", holder["loss"])  # same weights and batch in both frameworks

    seconds = timed_steps(step, steps)
    lengths = {k: v.shape[1] for k, v in batch.items()}
    flops = model.flops_per_example(variables["params"], lengths) * BATCH
    peak_dtype = jax.numpy.bfloat16 if dtype == "bfloat16" else jax.numpy.float32
    try:
        peak = matmul_peak.measure_matmul_peak(peak_dtype, min_seconds=3.0)
    except TypeError:  # a checkout from before min_seconds (for "before" runs)
        peak = matmul_peak.measure_matmul_peak(peak_dtype, repeats=30)
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", 0) / 2 ** 30 if memory is not None else float("nan")
    return {"seconds": seconds, "flops": flops, "peak": peak, "rss_gib": peak_rss_gib(), "temp_gib": temp,
            "tokens": tokens_per_step(batch), "loss": holder["first_loss"], "threads": os.cpu_count()}


def run_transformers(family: str, dtype: str, checkpoint: str, steps: int) -> dict:
    import contextlib

    import torch

    model = hf_model_class(family).from_pretrained(checkpoint, torch_dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    b = make_batch(family)
    long = lambda k: torch.as_tensor(b[k], dtype=torch.long)  # noqa: E731
    if family in ("decoder_only", "moe"):
        inputs = {"input_ids": long("decoder_input_tokens"), "labels": None}
        targets = long("decoder_target_tokens")
    elif family == "encoder_only":
        inputs = {"input_ids": long("encoder_input_tokens"),
                  "labels": torch.where(torch.as_tensor(b["encoder_loss_weights"]) > 0,
                                        long("encoder_target_tokens"), -100)}
    else:
        inputs = {"input_ids": long("encoder_input_tokens"), "decoder_input_ids": long("decoder_input_tokens"),
                  "labels": long("decoder_target_tokens")}
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext())
    holder = {}

    def step():
        with autocast:
            out = model(**inputs)
            if family in ("decoder_only", "moe"):  # targets are given pre-shifted, as in seqio
                loss = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, VOCAB), targets.reshape(-1))
                if family == "moe" and getattr(out, "aux_loss", None) is not None:
                    loss = loss + model.config.router_aux_loss_coef * out.aux_loss
            else:
                loss = out.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        holder["loss"] = float(loss)
        holder.setdefault("first_loss", holder["loss"])

    seconds = timed_steps(step, steps)
    n = 2048
    a = torch.ones(n, n, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    best = timed_steps(lambda: torch.mm(a, a), 5)
    return {"seconds": seconds, "peak": 2 * n ** 3 / best, "rss_gib": peak_rss_gib(), "temp_gib": float("nan"),
            "tokens": tokens_per_step(b), "loss": holder["first_loss"], "threads": torch.get_num_threads(),
            "flops": float("nan")}


def time_step(family: str, dtype: str = "float32", steps: int = 2) -> float:
    """Best seconds per t5x_like train step of the medium model built directly (no transformers)."""
    import jax

    from t5x_like.training import optimizers, steps as steps_lib
    from t5x_like.training.train_state import TrainState

    model = medium_model(family, dtype)
    optimizer = optimizers.adamw(peak_learning_rate=1e-4, warmup_steps=10, decay_steps=1000)
    batch = jax.device_put(make_batch(family))
    state = jax.jit(lambda rng: TrainState.create(model, optimizer, rng, batch))(jax.random.key(0))
    compiled = steps_lib.make_train_step(model, optimizer, dropout=False).lower(state, batch).compile()
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    return timed_steps(step, steps)


def worker(args) -> None:
    if args.framework == CAPACITY_ROW:
        result = run_t5x_like(args.family, args.dtype, args.checkpoint, args.steps, moe_impl="capacity")
    else:
        run = run_t5x_like if args.framework == "t5x_like" else run_transformers
        result = run(args.family, args.dtype, args.checkpoint, args.steps)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(framework: str, family: str, dtype: str, checkpoint: str, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--framework", framework, "--family", family, "--dtype", dtype,
           "--checkpoint", checkpoint, "--steps", str(steps)]
    # Both frameworks get the allocator settings `python -m t5x_like.main` runs with (host_runtime.py).
    env = host_runtime.tuned_env() if host_runtime else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--frameworks", default="t5x_like,transformers")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--framework", help=argparse.SUPPRESS)
    p.add_argument("--family", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch

    families = [f for f in args.families.split(",") if f]
    frameworks = [f for f in args.frameworks.split(",") if f]
    print(f"cores: {os.cpu_count()}, batch {BATCH} x seq {SEQ} (enc-dec targets {DEC_SEQ}), d_model {D_MODEL}, "
          f"{HEADS} heads, {LAYERS} layers, MLP {MLP}, vocab {VOCAB}; MoE {EXPERTS} experts top-{TOP_K}")
    header = (f"{'family':16} {'dtype':9} {'framework':17} {'step s':>7} {'tok/s':>8} {'TFLOP/s':>8} "
              f"{'peak TF/s':>9} {'MFU':>6} {'RSS GiB':>8} {'loss@0':>7}")
    print(header)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            torch.manual_seed(0)
            checkpoint = os.path.join(tmp, family)
            hf_model_class(family)(hf_config(family)).save_pretrained(checkpoint, safe_serialization=True)
            for dtype in args.dtypes.split(","):
                flops = None
                runs = frameworks
                if family == "moe" and "t5x_like" in frameworks:
                    runs = frameworks[:frameworks.index("t5x_like") + 1] + [CAPACITY_ROW] + \
                        frameworks[frameworks.index("t5x_like") + 1:]
                for framework in runs:
                    r = spawn(framework, family, dtype, checkpoint, args.steps)
                    rows[(family, dtype, framework)] = r
                    if "error" in r:
                        print(f"{family:16} {dtype:9} {framework:17} failed: {r['error']}", flush=True)
                        continue
                    flops = r["flops"] if framework.startswith("t5x_like") else flops
                    if flops is None:  # transformers alone: count with t5x_like's formula anyway
                        flops = spawn("t5x_like", family, dtype, checkpoint, 0).get("flops", float("nan"))
                    r["tok_s"] = r["tokens"] / r["seconds"]
                    r["tflops"] = flops / r["seconds"] / 1e12
                    r["mfu"] = flops / r["seconds"] / r["peak"]
                    print(f"{family:16} {dtype:9} {framework:17} {r['seconds']:7.2f} {r['tok_s']:8.0f} "
                          f"{r['tflops']:8.3f} {r['peak'] / 1e12:9.3f} {r['mfu']:6.1%} {r['rss_gib']:8.2f} "
                          f"{r['loss']:7.3f}", flush=True)
    ratios = {}
    for (family, dtype, framework), r in rows.items():
        peer = rows.get((family, dtype, "transformers"), {})
        if framework == "t5x_like" and "tok_s" in r and "tok_s" in peer:
            ratios[(family, dtype)] = r["tok_s"] / peer["tok_s"]
    if ratios:
        print("t5x_like / transformers tokens/s: " + ", ".join(f"{f} {d} {v:.2f}x" for (f, d), v in ratios.items()))
    moe = {d: r["tok_s"] / rows[(f, d, CAPACITY_ROW)]["tok_s"] for (f, d, fw), r in rows.items()
           if fw == "t5x_like" and "tok_s" in r and "tok_s" in rows.get((f, d, CAPACITY_ROW), {})}
    if moe:
        print(f"moe dropless / capacity {CAPACITY} tokens/s (targets: 1.2x capacity, 1.3x transformers): "
              + ", ".join(f"{d} {v:.2f}x" for d, v in moe.items()))
    mfu = rows.get(("decoder_only", "float32", "t5x_like"), {}).get("mfu")
    worst = min(ratios.items(), key=lambda kv: kv[1]) if ratios else None
    print("RESULT decoder-only f32 MFU " + (f"{mfu:.1%} (target 70%)" if mfu is not None else "n/a")
          + "; worst speedup over transformers " + (f"{worst[1]:.2f}x ({worst[0][0]} {worst[0][1]}; target 1.5x)"
                                                     if worst else "n/a"))


if __name__ == "__main__":
    main()
