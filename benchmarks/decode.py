"""Decode and prefill speed on one randomly initialised Llama (built in transformers, imported),
side by side in one run: t5x_like with the KV cache (prompts prefilled in one pass, or fed one token
per step as before), without it (full recompute per step), with bfloat16 activations, with an int8
KV cache, and transformers' `generate`.

    python benchmarks/decode.py [--batch 4] [--prompt 16] [--new 64] [--prefill_prompt 256] [--d_model 256]

Decode rows: greedy, EOS disabled, so every run emits exactly batch * new tokens. Prefill rows:
batch prompts of --prefill_prompt tokens and one new token, counted as prompt tokens/s: one
forward pass against the old one-token-per-step feed. Compilation is excluded (one warm-up call
per path). The last line gives the figures and the ratios.
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
from t5x_like.models import model_for_config


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
    p.add_argument("--prefill_prompt", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model,
                                   intermediate_size=4 * args.d_model, num_hidden_layers=args.layers,
                                   num_attention_heads=args.heads, num_key_value_heads=args.heads,
                                   max_position_embeddings=max(args.prompt + args.new, args.prefill_prompt + 1) + 8)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d, safe_serialization=True)
        model, variables = hf.load(d)
    variables = jax.device_put(variables)
    prompts = np.random.default_rng(0).integers(3, args.vocab, (args.batch, args.prompt)).astype(np.int32)
    tokens = args.batch * args.new

    bf16 = model_for_config(model.config.replace(dtype="bfloat16"))

    def ours(use_cache=True, prefill=True, kv_cache_dtype=None, net=model, ids=prompts, new=args.new):
        def run():
            out = decoding.generate(net, variables, ids, max_new_tokens=new, eos_id=-1, use_cache=use_cache,
                                    prefill=prefill, kv_cache_dtype=kv_cache_dtype)
            return out.tokens
        return run

    def theirs():
        with torch.no_grad():
            return ref.generate(input_ids=torch.as_tensor(prompts, dtype=torch.long), max_new_tokens=args.new,
                                min_new_tokens=args.new, do_sample=False, num_beams=1, pad_token_id=0)

    same = np.array_equal(ours()(), theirs().numpy()[:, args.prompt:])
    same_old = np.array_equal(ours()(), ours(prefill=False)())
    int8_agree = np.mean(ours(kv_cache_dtype="int8")() == ours()())
    print(f"device: {jax.devices()[0].device_kind}, torch threads: {torch.get_num_threads()}, "
          f"model: llama d_model={args.d_model} layers={args.layers} vocab={args.vocab}, "
          f"batch={args.batch} prompt={args.prompt} new={args.new}")
    print(f"greedy outputs identical to transformers: {same}; prefill identical to the one-token feed: "
          f"{same_old}; int8 KV cache tokens equal to float32: {int8_agree:.1%}")
    results = {}
    for name, fn in [("cached f32", ours()), ("cached f32, old feed", ours(prefill=False)),
                     ("cached bf16", ours(net=bf16)), ("cached f32, int8 KV", ours(kv_cache_dtype="int8")),
                     ("no cache f32", ours(False)), ("transformers generate", theirs)]:
        seconds = timed(fn, args.repeats)
        results[name] = tokens / seconds
        print(f"decode  {name:24s} {seconds * 1000:9.1f} ms  {results[name]:10.1f} tokens/s")
    long = np.random.default_rng(1).integers(3, args.vocab, (args.batch, args.prefill_prompt)).astype(np.int32)
    prompt_tokens = args.batch * args.prefill_prompt
    for name, prefill in [("prefill one pass", True), ("prefill old feed", False)]:
        seconds = timed(ours(prefill=prefill, ids=long, new=1), args.repeats)
        results[name] = prompt_tokens / seconds
        print(f"{name:32s} {seconds * 1000:9.1f} ms  {results[name]:10.1f} prompt tokens/s")
    cached = results["cached f32"]
    print(f"RESULT prefill x{results['prefill one pass'] / results['prefill old feed']:.1f} the one-token feed "
          f"({args.prefill_prompt}-token prompts; target 10x); decode {cached:.1f} tokens/s: "
          f"x{cached / results['transformers generate']:.2f} transformers (target 3x), "
          f"x{cached / results['cached f32, old feed']:.2f} the old feed, "
          f"x{cached / results['no cache f32']:.2f} no cache; "
          f"bf16 x{results['cached bf16'] / cached:.2f}, int8 KV x{results['cached f32, int8 KV'] / cached:.2f} of f32")


if __name__ == "__main__":
    main()
