"""Decode and prefill speed on one randomly initialised Llama (built in transformers, imported),
side by side in one run: t5x_like with the KV cache (prompts prefilled in one pass, or fed one token
per step as before), without it (full recompute per step), with bfloat16 activations, with an int8
KV cache, and transformers' `generate`.

    python benchmarks/decode.py [--batch 4] [--prompt 16] [--new 64] [--prefill_prompt 256] [--d_model 256]

Decode rows: greedy, EOS disabled, so every run emits exactly batch * new tokens. Prefill rows:
batch prompts of --prefill_prompt tokens and one new token, counted as prompt tokens/s: one
forward pass against the old one-token-per-step feed. Compilation is excluded (one warm-up call
per path). The last line gives the figures and the ratios.

Speculative rows (`--spec_layers`, `--draft_layers`, `--gamma`; `--only_speculative` skips the rest):
a deeper Llama target whose layers above the draft's contribute little (their output projections
scaled by `--damp`, so that a shallow draft agrees with it often, as a trained draft would), and a
draft made of its embeddings, first layers, final norm and head. Speculative greedy decoding against
plain cached decoding of the same target (batch --batch and batch 1), and transformers' `generate`
and assisted generation (`assistant_model=`, constant --gamma draft tokens; batch 1 only) on the
same imported pair.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from t5x_like.inference import decoding, speculative
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
    p.add_argument("--spec_layers", type=int, default=8)
    p.add_argument("--draft_layers", type=int, default=1)
    p.add_argument("--spec_vocab", type=int, default=2048)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--spec_d_model", type=int, default=512)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--only_speculative", action="store_true")
    args = p.parse_args()
    if not args.only_speculative:
        plain_rows(args)
    speculative_rows(args)


def plain_rows(args):

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


def _spec_pair(args):
    """(target and draft in transformers, the same two imported) for the speculative rows."""
    def config(layers):
        return transformers.LlamaConfig(vocab_size=args.spec_vocab, hidden_size=args.spec_d_model,
                                        intermediate_size=4 * args.spec_d_model, num_hidden_layers=layers,
                                        num_attention_heads=args.heads, num_key_value_heads=args.heads,
                                        max_position_embeddings=args.prompt + args.new + args.gamma + 8)
    torch.manual_seed(1)
    target = transformers.LlamaForCausalLM(config(args.spec_layers)).eval()
    with torch.no_grad():
        for layer in target.model.layers[args.draft_layers:]:
            layer.self_attn.o_proj.weight.mul_(args.damp)
            layer.mlp.down_proj.weight.mul_(args.damp)
    draft = transformers.LlamaForCausalLM(config(args.draft_layers)).eval()
    draft.load_state_dict(target.state_dict(), strict=False)  # the target's first layers, embeddings, head
    with tempfile.TemporaryDirectory() as d:
        target.save_pretrained(f"{d}/t", safe_serialization=True)
        draft.save_pretrained(f"{d}/d", safe_serialization=True)
        return target, draft, hf.load(f"{d}/t"), hf.load(f"{d}/d")


def speculative_rows(args):
    ref, ref_draft, (model, variables), (draft, draft_vars) = _spec_pair(args)
    variables, draft_vars = jax.device_put(variables), jax.device_put(draft_vars)
    size = lambda m: sum(x.numel() for x in m.parameters())  # noqa: E731
    body = lambda m: sum(x.numel() for n, x in m.named_parameters() if ".layers." in n)  # noqa: E731
    prompts = np.random.default_rng(2).integers(3, args.spec_vocab, (args.batch, args.prompt)).astype(np.int32)
    ref_draft.generation_config.num_assistant_tokens = args.gamma
    ref_draft.generation_config.num_assistant_tokens_schedule = "constant"

    def plain(ids):
        return lambda: decoding.generate(model, variables, ids, max_new_tokens=args.new, eos_id=-1).tokens

    stats = {}

    def spec(ids):
        def run():
            out = speculative.speculative_generate(model, variables, draft, draft_vars, ids, gamma=args.gamma,
                                                   max_new_tokens=args.new, eos_id=-1)
            stats[ids.shape[0]] = out
            return out.tokens
        return run

    def theirs(assistant=None):
        def run():
            with torch.no_grad():
                return ref.generate(input_ids=torch.as_tensor(prompts[:1], dtype=torch.long), max_new_tokens=args.new,
                                    min_new_tokens=args.new, do_sample=False, num_beams=1, pad_token_id=0,
                                    assistant_model=assistant).numpy()[:, args.prompt:]
        return run

    one = prompts[:1]
    same = np.array_equal(spec(prompts)(), plain(prompts)())
    same_hf = np.array_equal(spec(one)(), theirs()()) and np.array_equal(theirs(ref_draft)(), theirs()())
    print(f"speculative: target llama {args.spec_layers} layers ({size(ref) / 1e6:.2f}M params, {body(ref) / 1e6:.2f}M "
          f"in layers), draft {args.draft_layers} layer(s) ({size(ref_draft) / 1e6:.2f}M, {body(ref_draft) / 1e6:.2f}M "
          f"in layers): x{size(ref) / size(ref_draft):.1f} smaller; vocab {args.spec_vocab}, gamma {args.gamma}")
    print(f"speculative greedy identical to plain greedy: {same}; to transformers (and its assisted) at batch 1: "
          f"{same_hf}")
    results = {}
    for name, fn, rows in [(f"plain batch {args.batch}", plain(prompts), args.batch),
                           (f"speculative batch {args.batch}", spec(prompts), args.batch),
                           ("plain batch 1", plain(one), 1), ("speculative batch 1", spec(one), 1),
                           ("transformers generate b1", theirs(), 1),
                           ("transformers assisted b1", theirs(ref_draft), 1)]:
        seconds = timed(fn, args.repeats)
        results[name] = rows * args.new / seconds
        print(f"decode  {name:28s} {seconds * 1000:9.1f} ms  {results[name]:10.1f} tokens/s")
    acc, r, b = stats[args.batch], results, args.batch
    print(f"RESULT speculative x{r[f'speculative batch {b}'] / r[f'plain batch {b}']:.2f} plain decode at batch {b}, "
          f"x{r['speculative batch 1'] / r['plain batch 1']:.2f} at batch 1 (target 1.5x); "
          f"x{r['speculative batch 1'] / r['transformers assisted b1']:.2f} transformers assisted (target >= 1), "
          f"which is x{r['transformers assisted b1'] / r['transformers generate b1']:.2f} its generate; "
          f"acceptance {acc.acceptance_rate:.1%}, {acc.tokens_per_pass:.2f} tokens per target pass")


if __name__ == "__main__":
    main()
