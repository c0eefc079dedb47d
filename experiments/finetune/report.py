"""Table and plot of the fine-tuning runs (experiments/finetune/README.md).

    python experiments/finetune/report.py [--runs runs/finetune_full runs/finetune_lora ...]

For each run: validation NLL and token accuracy (last evaluation), exact match and chrF of the
generate-and-score evaluation (`infer_eval` into the run folder), trainable parameters, optimizer-
state and parameter bytes (from the run's own gin config: its model, LoRA and quantization, AdamW
state over the trainable parameters), and the median train step time. Writes curves.png beside this
file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import jax
import numpy as np

from t5x_like import gin_config
from t5x_like.training import optimizers
from t5x_like.training.train_state import TrainState
from t5x_like.training.trainable import TrainableSubset

HERE = os.path.dirname(os.path.abspath(__file__))
TASK = "embedded_docstring_name_spm"


def _bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def state_sizes(run_dir: str) -> dict:
    gin_config.parse([os.path.join(run_dir, "config.gin")], [])
    model = gin_config.model_from_gin()
    optimizer = TrainableSubset(optimizers.adamw(), model.trainable_params_regex())
    state = TrainState.abstract(model, optimizer)
    trainable, _ = optimizer.split(state.params)
    return {"trainable_params": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(trainable))),
            "param_bytes": _bytes(state.params), "opt_state_bytes": _bytes(state.opt_state)}


def metrics(run_dir: str) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    evals = [r for r in rows if r["split"] == "eval"]
    generated = [r for r in rows if r["split"] == f"infer_eval/{TASK}"]
    steps = [r["step_time_s"] for r in rows if r["split"] == "train" and "step_time_s" in r]
    out = {"curve": [(r["step"], r["nll"]) for r in evals], "nll": evals[-1]["nll"],
           "accuracy": evals[-1]["accuracy"], "step_time_s": statistics.median(steps)}
    if generated:
        out.update(exact_match=generated[-1]["exact_match"], chrf=generated[-1]["chrf"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="+", default=[f"runs/finetune_{k}" for k in ("full", "lora", "qlora", "t5_full", "t5_lora")])
    args = parser.parse_args()
    results = {run: {**state_sizes(run), **metrics(run)} for run in args.runs}
    print("| run | val NLL | token acc | exact match | chrF | trainable params | optimizer state | params | step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run, r in results.items():
        print(f"| {os.path.basename(run)} | {r['nll']:.3f} | {100 * r['accuracy']:.1f}% | "
              f"{r.get('exact_match', float('nan')):.1f} | {r.get('chrf', float('nan')):.1f} | "
              f"{r['trainable_params']:,} | {r['opt_state_bytes'] / 2**20:.2f} MiB | {r['param_bytes'] / 2**20:.2f} MiB | "
              f"{r['step_time_s']:.3f} s |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for run, r in results.items():
        steps, nll = zip(*r["curve"])
        ax.plot(steps, nll, marker="o", label=os.path.basename(run))
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation NLL (target tokens)")
    ax.set_title(TASK)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "curves.png"), dpi=100)


if __name__ == "__main__":
    main()
