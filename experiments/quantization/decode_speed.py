"""Greedy decode tokens/s of the trained quickstart model: f32 against its `quantize` outputs (int8 and
int4 codes), each multiplied weight-only (dequantize) and with int8 activations (quantized_matmul).

    python experiments/quantization/decode_speed.py [--batch 4] [--new 64] [--repeats 5]

Needs runs/quickstart and runs/quickstart_{int8,int4}_q (README.md, Commands); the int8-activation
rows restore the same checkpoints with `DecoderOnlyModel.quantized_matmul = 'int8'` bound.
Random prompt ids, EOS off: every row emits --new tokens. Best of --repeats after a warm-up call.
"""

import argparse
import time

import numpy as np

from t5x_like import gin_config
from t5x_like.inference import decoding
from t5x_like.training import checkpointing
from t5x_like.training.train_state import abstract_params


def load(folder, gin_file, matmul=None):
    gin_config.parse([gin_file], [f"DecoderOnlyModel.quantized_matmul = '{matmul}'"] if matmul else [])
    model = gin_config.model_from_gin()
    return model, {"params": checkpointing.restore_params(folder, target=abstract_params(model))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    runs = {"f32": load("runs/quickstart", "runs/quickstart/config.gin")}
    for s in ("int8", "int4"):
        folder = f"runs/quickstart_{s}_q"
        runs[f"{s} weights"] = load(folder, f"{folder}/model.gin")
        runs[f"{s} weights, int8 act"] = load(folder, f"{folder}/model.gin", "int8")
    prompts = np.random.default_rng(0).integers(3, 8000, (args.batch, args.prompt)).astype(np.int32)
    fns = {k: (lambda m=m, v=v: decoding.generate(m, v, prompts, max_new_tokens=args.new, eos_id=-1).tokens)
           for k, (m, v) in runs.items()}
    tokens = {k: f() for k, f in fns.items()}  # also the warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(args.repeats):  # interleaved, so that load on a shared machine hits every row alike
        for k, f in fns.items():
            start = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - start)
    for k in fns:
        print(f"{k:22s} {args.batch * args.new / best[k]:8.1f} tokens/s  x{best['f32'] / best[k]:.2f} f32  "
              f"greedy tokens equal to f32: {np.mean(tokens[k] == tokens['f32']):.0%}")


if __name__ == "__main__":
    main()
