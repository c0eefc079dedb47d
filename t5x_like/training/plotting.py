"""Training curves of one or more runs from their `metrics.jsonl`, drawn into one PNG.

`python -m t5x_like.training.plotting RUN_DIR [RUN_DIR ...] --out curves.png [--metrics loss perplexity]`
One panel per metric; each run has its own colour, train solid and eval dashed with markers.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Iterable, Sequence

from t5x_like.training.metrics_writer import JSONL


def read_metrics(run_dir: str) -> dict:
    """{split: {metric: ([steps], [values])}}, each (split, step) once: a repeated one (logs of
    runs resumed before the trainer dropped re-logged steps on resume) keeps its last record, the
    one of the run that continued. Lines cut off by a crash are skipped."""
    path = run_dir if os.path.isfile(run_dir) else os.path.join(run_dir, JSONL)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {JSONL} in {run_dir}; pass the run's model directory")
    last = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut off by a crash: skip it, keep the rest
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
                last[(str(rec.get("split", "train")), int(rec["step"]))] = rec
    out = {}
    for (split, step), rec in sorted(last.items()):
        for k, v in rec.items():
            if k not in ("step", "split", "time") and isinstance(v, (int, float)):
                steps, values = out.setdefault(split, {}).setdefault(k, ([], []))
                steps.append(step)
                values.append(v)
    return out


def _run_name(run_dir: str) -> str:
    path = os.path.abspath(run_dir)
    return os.path.basename(os.path.dirname(path) if os.path.isfile(path) else path)


def plot_runs(run_dirs: Sequence[str], out_png: str, metrics: Iterable[str] = ("loss", "perplexity")) -> str:
    """Write the PNG and return its path. Perplexity panels use a log scale (it falls by orders of
    magnitude early on)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (FuncFormatter below)

    metrics = list(metrics)
    runs = [(_run_name(d), read_metrics(d)) for d in run_dirs]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[0], metrics):
        drawn = False
        for i, (name, data) in enumerate(runs):
            for split, curves in sorted(data.items()):
                if metric not in curves:
                    continue
                steps, values = curves[metric]
                style = dict(linestyle="-") if split == "train" else dict(linestyle="--", marker="o", markersize=3)
                ax.plot(steps, values, color=colours[i % len(colours)], label=f"{name} ({split})", **style)
                drawn = True
        ax.set_title(metric)
        ax.set_xlabel("step")
        if drawn:
            if "perplexity" in metric and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
                ax.set_yscale("log")
                plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(plain)
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no '{metric}' in these runs", ha="center", va="center", transform=ax.transAxes)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m t5x_like.training.plotting", description=__doc__)
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--metrics", nargs="+", default=["loss", "perplexity"])
    args = parser.parse_args(argv)
    print(plot_runs(args.run_dirs, args.out, args.metrics))


if __name__ == "__main__":
    main()
