"""Reward and KL curves and held-out success of the GRPO / PPO runs (experiments/alignment/README.md).

    python experiments/alignment/rl_report.py [--runs runs/alignment_grpo runs/alignment_ppo]
        [--output experiments/alignment/rl_curves.png]

Prints a markdown table: held-out greedy success rate (`eval/reward`) at the start (the SFT model)
and at the end, and the train reward / KL averaged over the first and last 20 RL steps.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def read(run_dir: str):
    train, evals = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for row in map(json.loads, f):
            (train if row["split"] == "train" else evals if row["split"] == "eval" else []).append(row)
    return train, evals


def smooth(x, k: int = 10):
    return np.convolve(x, np.ones(k) / k, mode="valid") if len(x) >= k else np.asarray(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["runs/alignment_grpo", "runs/alignment_ppo"])
    parser.add_argument("--output", default="experiments/alignment/rl_curves.png")
    args = parser.parse_args()
    print("| run | held-out success, SFT (step 0) | held-out success, end | train reward first/last 20 steps "
          "| KL first/last 20 steps |")
    print("|---|---|---|---|---|")
    curves = {}
    for run in args.runs:
        if not os.path.isfile(os.path.join(run, "metrics.jsonl")):
            continue
        train, evals = read(run)
        curves[run] = train
        reward, kl = [r["reward"] for r in train], [r["kl"] for r in train]
        print(f"| {os.path.basename(run)} | {evals[0]['reward']:.3f} | {evals[-1]['reward']:.3f} (step "
              f"{evals[-1]['step']}) | {np.mean(reward[:20]):.3f} / {np.mean(reward[-20:]):.3f} | "
              f"{np.mean(kl[:20]):.4f} / {np.mean(kl[-20:]):.4f} |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_r, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.5))
    for run, train in curves.items():
        steps = [r["step"] for r in train]
        r = smooth([x["reward"] for x in train])
        ax_r.plot(steps[len(steps) - len(r):], r, label=os.path.basename(run))
        k = smooth([x["kl"] for x in train])
        ax_kl.plot(steps[len(steps) - len(k):], k, label=os.path.basename(run))
    ax_r.set(xlabel="RL step", ylabel="train reward (10-step mean)")
    ax_kl.set(xlabel="RL step", ylabel="KL to the SFT model (10-step mean)")
    ax_r.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(args.output)


if __name__ == "__main__":
    main()
