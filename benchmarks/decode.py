"""Decode speed: t5x_like with the KV cache, without it (full recompute per step), and transformers'
`generate`, on the same randomly initialised Llama (built in transformers, imported) and machine.

    python benchmarks/decode.py [--batch 4] [--prompt 16] [--new 64] [--d_model 256] [--layers 4]

Greedy decoding, EOS disabled so every run emits exactly batch * new tokens. Compilation is
excluded (one warm-up call per path). The last line gives the figure and the ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from t5x_like.inference import decoding
from t5x_like.interop import hf


def timed(fn, repeats):
    fn()  # warm-up: compilation / first-call allocation
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model,
                                   intermediate_size=4 * args.d_model, num_hidden_layers=args.layers,
                                   num_attention_heads=args.heads, num_key_value_heads=args.heads,
                                   max_position_embeddings=args.prompt + args.new + 8)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d, safe_serialization=True)
        model, variables = hf.load(d)
    variables = jax.device_put(variables)
    prompts = np.random.default_rng(0).integers(3, args.vocab, (args.batch, args.prompt)).astype(np.int32)
    tokens = args.batch * args.new

    def ours(use_cache):
        def run():
            out = decoding.generate(model, variables, prompts, max_new_tokens=args.new, eos_id=-1,
                                    use_cache=use_cache)
            return out.tokens
        return run

    def theirs():
        with torch.no_grad():
            return ref.generate(input_ids=torch.as_tensor(prompts, dtype=torch.long), max_new_tokens=args.new,
                                min_new_tokens=args.new, do_sample=False, num_beams=1, pad_token_id=0)

    same = np.array_equal(ours(True)(), theirs().numpy()[:, args.prompt:])
    print(f"device: {jax.devices()[0].device_kind}, torch threads: {torch.get_num_threads()}, "
          f"model: llama d_model={args.d_model} layers={args.layers} vocab={args.vocab}, "
          f"batch={args.batch} prompt={args.prompt} new={args.new}")
    print(f"greedy outputs identical to transformers: {same}")
    results = {}
    for name, fn in [("t5x_like cached", ours(True)), ("t5x_like no cache", ours(False)),
                     ("transformers generate", theirs)]:
        seconds = timed(fn, args.repeats)
        results[name] = tokens / seconds
        print(f"{name:24s} {seconds * 1000:9.1f} ms  {results[name]:10.1f} tokens/s")
    cached = results["t5x_like cached"]
    print(f"decode tokens/s: cached {cached:.1f}; cache speed-up x{cached / results['t5x_like no cache']:.2f}; "
          f"vs transformers x{cached / results['transformers generate']:.2f}")


if __name__ == "__main__":
    main()
