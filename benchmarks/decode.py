"""Decode and prefill speed on one randomly initialised Llama (built in transformers, imported),
side by side in one run: t5x_like with the KV cache (prompts prefilled in one pass, or fed one token
per step as before), without it (full recompute per step), with bfloat16 activations, with an int8
KV cache, with int8 / int4 weights (the `quantize` mode's checkpoint; dequantized, or times int8
activations), and transformers' `generate`.

    python benchmarks/decode.py [--batch 4] [--prompt 16] [--new 64] [--prefill_prompt 256] [--d_model 256]

Decode rows: greedy, EOS disabled, so every run emits exactly batch * new tokens. Prefill rows:
batch prompts of --prefill_prompt tokens and one new token, counted as prompt tokens/s: one
forward pass against the old one-token-per-step feed. Compilation is excluded (one warm-up call
per path). The last line gives the figures and the ratios.

Speculative rows (`--gamma`; `--only_speculative` skips the rest): speculative greedy decoding
against plain cached decoding of the same target (batch --batch and batch 1), and transformers'
`generate` and assisted generation (`assistant_model=`, constant --gamma draft tokens; batch 1 only)
on the same pair exported to Hugging Face Llama. The pair:
- trained (`--target_run DIR --draft_run DIR`, e.g. runs/quickstart and a draft trained with
  gin/runs/draft.gin or draft_distill.gin; each model from its run's config.gin, the latest
  checkpoint): prompts are the first --prompt tokens (after BOS 0) of the task's validation examples
  (`--task`, default the target run's MIXTURE_OR_TASK_NAME), and the greedy acceptance rate is first
  measured on --acceptance_rows of them (`--acceptance_only` stops there);
- otherwise a stand-in (`--spec_layers`, `--draft_layers`, `--spec_d_model`, `--spec_vocab`, `--damp`):
  a random Llama target whose layers above the draft's contribute little (output projections scaled
  by --damp, so that a shallow draft agrees with it often, as a trained draft would) and a draft made
  of its embeddings, first layers, final norm and head; random prompt ids.
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
    p.add_argument("--target_run", help="a trained target's run folder (its config.gin and checkpoints)")
    p.add_argument("--draft_run", help="a trained draft's run folder (same vocabulary as the target)")
    p.add_argument("--task", help="prompts from this task's validation split (default: the target run's)")
    p.add_argument("--acceptance_rows", type=int, default=64)
    p.add_argument("--acceptance_only", action="store_true")
    args = p.parse_args()
    if bool(args.target_run) != bool(args.draft_run):
        p.error("--target_run and --draft_run go together")
    if not args.only_speculative and not args.acceptance_only:
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
    # The `quantize` mode's serving checkpoints: kernels, embedding and output projection as int8 / int4
    # codes, multiplied weight-only (dequantize) or with int8 activations (layers/quantized_matmul.py).
    quantized = {}
    for scheme, matmul in [(s, m) for s in ("int8", "int4") for m in ("dequantize", "int8")]:
        net = type(model)(model.config, weight_quantization=scheme, quantize_embeddings=True, quantized_matmul=matmul)
        quantized[scheme, matmul] = net, {**variables, "params": net.quantize_params(variables["params"])}

    def ours(use_cache=True, prefill=True, kv_cache_dtype=None, net=model, ids=prompts, new=args.new,
             net_variables=None):
        def run():
            out = decoding.generate(net, net_variables or variables, ids, max_new_tokens=new, eos_id=-1,
                                    use_cache=use_cache, prefill=prefill, kv_cache_dtype=kv_cache_dtype)
            return out.tokens
        return run

    def weights(scheme, matmul):
        net, net_variables = quantized[scheme, matmul]
        return ours(net=net, net_variables=net_variables)

    def theirs():
        with torch.no_grad():
            return ref.generate(input_ids=torch.as_tensor(prompts, dtype=torch.long), max_new_tokens=args.new,
                                min_new_tokens=args.new, do_sample=False, num_beams=1, pad_token_id=0)

    same = np.array_equal(ours()(), theirs().numpy()[:, args.prompt:])
    same_old = np.array_equal(ours()(), ours(prefill=False)())
    int8_agree = np.mean(ours(kv_cache_dtype="int8")() == ours()())
    w8a8_agree = np.mean(weights("int8", "int8")() == ours()())
    print(f"device: {jax.devices()[0].device_kind}, torch threads: {torch.get_num_threads()}, "
          f"model: llama d_model={args.d_model} layers={args.layers} vocab={args.vocab}, "
          f"batch={args.batch} prompt={args.prompt} new={args.new}")
    print(f"greedy outputs identical to transformers: {same}; prefill identical to the one-token feed: "
          f"{same_old}; int8 KV cache tokens equal to float32: {int8_agree:.1%}; int8 weights and activations: "
          f"{w8a8_agree:.1%}")
    results = {}
    for name, fn in [("cached f32", ours()), ("cached f32, old feed", ours(prefill=False)),
                     ("cached bf16", ours(net=bf16)), ("cached f32, int8 KV", ours(kv_cache_dtype="int8")),
                     ("int8 weights", weights("int8", "dequantize")),
                     ("int8 weights, int8 act", weights("int8", "int8")),
                     ("int4 weights", weights("int4", "dequantize")),
                     ("int4 weights, int8 act", weights("int4", "int8")),
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
          f"bf16 x{results['cached bf16'] / cached:.2f}, int8 KV x{results['cached f32, int8 KV'] / cached:.2f}, "
          + ", ".join(f"{s} weights x{results[f'{s} weights'] / cached:.2f} (int8 act "
                      f"x{results[f'{s} weights, int8 act'] / cached:.2f})" for s in ("int8", "int4")) + " of f32")


def _spec_pair(args):
    """(target and draft in transformers, the same two imported, prompts) for the stand-in pair."""
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
    prompts = np.random.default_rng(2).integers(3, args.spec_vocab, (args.batch, args.prompt)).astype(np.int32)
    with tempfile.TemporaryDirectory() as d:
        target.save_pretrained(f"{d}/t", safe_serialization=True)
        draft.save_pretrained(f"{d}/d", safe_serialization=True)
        return target, draft, hf.load(f"{d}/t"), hf.load(f"{d}/d"), prompts


def _restore_run(run_dir):
    """(model, variables, (its task, its task feature lengths)) of a run folder: the model its config.gin
    builds, latest checkpoint."""
    import gin

    from t5x_like import gin_config
    from t5x_like.training import checkpointing

    gin_config.parse([f"{run_dir}/config.gin"])
    model = gin_config.model_from_gin()
    task = gin.query_parameter("%MIXTURE_OR_TASK_NAME"), gin.query_parameter("%TASK_FEATURE_LENGTHS")
    return model, {"params": checkpointing.restore_model_params(run_dir, model)}, task


def validation_prompts(task, feature_lengths, rows, length):
    """[rows, length] ids: BOS 0 then the first length - 1 tokens of the task's validation examples
    (as the run's `feature_lengths` cut them; the layout of a training row's decoder input), in order."""
    import seqio

    import t5x_like.data  # noqa: F401  (registers the corpora's tasks)

    ds = seqio.get_mixture_or_task(task).get_dataset(dict(feature_lengths), split="validation", shuffle=False)
    out = [[0, *ex["targets"][:length - 1]] for ex in ds.as_numpy_iterator() if len(ex["targets"]) >= length - 1]
    if len(out) < rows:
        raise SystemExit(f"{task!r} has {len(out)} validation examples of >= {length - 1} tokens; fewer rows needed")
    return np.asarray(out[:rows], np.int32)


def _trained_pair(args):
    """(target and draft exported to transformers, the two restored runs, validation prompts)."""
    model, variables, (task, lengths) = _restore_run(args.target_run)
    draft, draft_vars, _ = _restore_run(args.draft_run)
    prompts = validation_prompts(args.task or task, lengths, max(args.batch, args.acceptance_rows), args.prompt)
    with tempfile.TemporaryDirectory() as d:
        hf.save(model, variables, f"{d}/t")
        hf.save(draft, draft_vars, f"{d}/d")
        ref = transformers.LlamaForCausalLM.from_pretrained(f"{d}/t").eval()
        ref_draft = transformers.LlamaForCausalLM.from_pretrained(f"{d}/d").eval()
    return ref, ref_draft, (model, variables), (draft, draft_vars), prompts


def acceptance(args, model, variables, draft, draft_vars, prompts):
    """Greedy acceptance over `prompts` (rows decoded together, --new tokens each, EOS off)."""
    out = speculative.speculative_generate(model, variables, draft, draft_vars, prompts, gamma=args.gamma,
                                           max_new_tokens=args.new, eos_id=-1)
    plain = decoding.generate(model, variables, prompts, max_new_tokens=args.new, eos_id=-1)
    same = np.array_equal(out.tokens, plain.tokens)
    print(f"acceptance on {len(prompts)} validation prompts ({args.prompt} tokens, {args.new} new, gamma "
          f"{args.gamma}): {out.acceptance_rate:.1%}, {out.tokens_per_pass:.2f} tokens per target pass; "
          f"greedy identical to plain: {same}")
    return out


def speculative_rows(args):
    trained = bool(args.target_run)
    ref, ref_draft, (model, variables), (draft, draft_vars), prompts = (_trained_pair if trained else _spec_pair)(args)
    variables, draft_vars = jax.device_put(variables), jax.device_put(draft_vars)
    size = lambda m: sum(x.numel() for x in m.parameters())  # noqa: E731
    body = lambda m: sum(x.numel() for n, x in m.named_parameters() if ".layers." in n)  # noqa: E731

    def describe(m):
        return (f"{m.config.num_hidden_layers} layers, d_model {m.config.hidden_size} ({size(m) / 1e6:.2f}M params, "
                f"{body(m) / 1e6:.2f}M in layers)")

    print(f"speculative: {'trained pair ' + args.target_run + ' / ' + args.draft_run if trained else 'stand-in pair'}; "
          f"target {describe(ref)}, draft {describe(ref_draft)}: x{size(ref) / size(ref_draft):.1f} smaller; "
          f"vocab {ref.config.vocab_size}, gamma {args.gamma}")
    if trained:
        acceptance(args, model, variables, draft, draft_vars, prompts[:args.acceptance_rows])
        if args.acceptance_only:
            return
    prompts = prompts[:args.batch]
    prompt_len = prompts.shape[1]
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
            ids = torch.as_tensor(prompts[:1], dtype=torch.long)  # BOS is id 0 = pad: an explicit mask
            with torch.no_grad():
                return ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                    min_new_tokens=args.new, do_sample=False, num_beams=1, pad_token_id=0,
                                    assistant_model=assistant).numpy()[:, prompt_len:]
        return run

    one = prompts[:1]
    same = np.array_equal(spec(prompts)(), plain(prompts)())
    same_hf = np.array_equal(spec(one)(), theirs()()) and np.array_equal(theirs(ref_draft)(), theirs()())
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
