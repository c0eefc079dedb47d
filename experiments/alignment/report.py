"""Held-out preference accuracy of each alignment run (experiments/alignment/README.md).

    python experiments/alignment/report.py [--runs runs/quickstart runs/alignment_sft ...]

For every run: the summed log-probability of each held-out pair's chosen and rejected completion
(prefs_dev.jsonl, prompts rendered with the plain template, as training saw them), from the run's own
config and latest checkpoint. Reported: preference accuracy (chosen more likely than rejected),
the mean log-probability margin, and against the SFT run as the reference, DPO's implicit reward
accuracy and margin (beta x the log-ratio difference, as TRL logs rewards/accuracies and margins).
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from t5x_like import gin_config
from t5x_like.data import iterators
from t5x_like.data.preferences import register_preference_task
from t5x_like.objectives.preference import reference_logps
from t5x_like.training import checkpointing

RUNS = ["runs/quickstart", "runs/alignment_sft", "runs/alignment_dpo_lora", "runs/alignment_dpo_full"]
DEV = "runs/alignment_data/prefs_dev.jsonl"
LENGTHS = {"inputs": 32, "targets": 16}
BETA = 0.1


def pair_logps(run_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) summed completion log-probabilities [pairs] under the run's latest params."""
    gin_config.parse([os.path.join(run_dir, "config.gin")], [])
    model = gin_config.model_from_gin()
    params = checkpointing.restore_params(run_dir)
    task = register_preference_task("alignment_dev", {"validation": [DEV]}, vocabulary="spm")
    ds = iterators.get_dataset(task, LENGTHS, split="validation", batch_size=16, shuffle=False, num_epochs=1,
                               drop_remainder=False, model=model)
    fn = jax.jit(lambda p, b: reference_logps(model, p, b))
    rows, real = [], []
    for batch in ds.as_numpy_iterator():
        rows.append(np.asarray(fn(params, batch)))
        real.append(batch["decoder_loss_weights"].sum(axis=1) > 0)  # not the last batch's padding
    rows, real = np.concatenate(rows), np.concatenate(real)
    keep = real[0::2] & real[1::2]
    return rows[0::2][keep], rows[1::2][keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=RUNS)
    parser.add_argument("--reference", default="runs/alignment_sft")
    args = parser.parse_args()
    runs = [r for r in args.runs if os.path.isdir(r)]
    logps = {r: pair_logps(r) for r in runs}
    ref_c, ref_r = logps[args.reference] if args.reference in logps else pair_logps(args.reference)
    print(f"| run | held-out pairs | preference accuracy | log-prob margin | DPO reward accuracy vs SFT | "
          f"DPO reward margin vs SFT (beta {BETA}) |")
    print("|---|---|---|---|---|---|")
    for run, (c, r) in logps.items():
        reward = BETA * ((c - ref_c) - (r - ref_r))
        print(f"| {os.path.basename(run)} | {len(c)} | {np.mean(c > r):.1%} | {np.mean(c - r):.2f} | "
              f"{np.mean(reward > 0):.1%} | {np.mean(reward):.3f} |")


if __name__ == "__main__":
    main()
