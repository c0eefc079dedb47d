"""A sweep's results: one row per trial, best first, as CSV and Markdown, plus PNG plots of the
objective against each parameter and every trial's training and validation curves.

Files written to the sweep directory: results.csv, results.md, objective.png, curves.png.
Curves come from each trial's metrics.jsonl (training/plotting.read_metrics), so trials that ran on
another host show up only when the sweep directory is shared.

The user attrs the worker records on its trials (SKIPPED, CRASHED) and `intended_params` live
here because the report reads them too: report.py needs only spec.py, and worker.py builds on both
without an import cycle.
"""

from __future__ import annotations

import csv
import math
import os

from t5x_like.sweep.spec import safe_url
from t5x_like.training.plotting import read_metrics

STATE_ORDER = ("COMPLETE", "PRUNED", "RUNNING", "WAITING", "FAIL")
SKIPPED, CRASHED = "skipped", "crashed"   # user attrs: never ran / raised (not retried)


def intended_params(trial) -> dict:
    """Parameters a trial has or, if it has not suggested them yet, was enqueued with."""
    return dict(trial.params) or dict(trial.system_attrs.get("fixed_params") or {})


def _objective(trial):
    """The final value, or for a pruned trial the last value it reported."""
    if trial.value is not None:
        return float(trial.value)
    if trial.intermediate_values:
        return float(trial.intermediate_values[max(trial.intermediate_values)])
    return None


def _curves(model_dir):
    try:
        return read_metrics(model_dir) if model_dir else {}
    except FileNotFoundError:
        return {}


def rows(study, spec) -> list[dict]:
    """Trials that ran or will run (skipped duplicates left out), best first."""
    sign = 1.0 if spec.direction == "minimize" else -1.0
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(SKIPPED):
            continue
        state = t.state.name
        value = _objective(t) if state in ("COMPLETE", "PRUNED") else None
        model_dir = t.user_attrs.get("model_dir", "")
        train = _curves(model_dir).get("train", {})
        steps = max(next(iter(train.values()))[0]) if train else None
        duration = ((t.datetime_complete - t.datetime_start).total_seconds()
                    if t.datetime_complete and t.datetime_start else None)
        error = t.user_attrs.get("error") or ("lost: worker stopped beating" if state == "FAIL" else "")
        out.append({"trial": t.number, "state": state, "objective": value,
                    **{s.name: intended_params(t).get(s.name) for s in spec.spaces},
                    "steps": steps, "duration_s": None if duration is None else round(duration, 1),
                    "error": error if state == "FAIL" else "", "model_dir": model_dir})
    out.sort(key=lambda r: (STATE_ORDER.index(r["state"]) if r["state"] in STATE_ORDER else 9,
                            sign * r["objective"] if r["objective"] is not None else math.inf, r["trial"]))
    return out


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(study, spec) -> str:
    """Write the tables and plots into the sweep directory; returns results.md's path."""
    os.makedirs(spec.sweep_dir, exist_ok=True)
    table = rows(study, spec)
    columns = ["trial", "state", "objective"] + [s.name for s in spec.spaces] + ["steps", "duration_s", "error"]
    with open(os.path.join(spec.sweep_dir, "results.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns + ["model_dir"])
        writer.writeheader()
        writer.writerows(table)
    plot_objective(table, spec, os.path.join(spec.sweep_dir, "objective.png"))
    plot_curves(table, spec, os.path.join(spec.sweep_dir, "curves.png"))

    counts = {}
    for r in table:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    best = next((r for r in table if r["state"] == "COMPLETE"), None)
    lines = [f"# Sweep `{spec.study}`", "",
             f"Spec `{spec.path}`, storage `{safe_url(spec.storage)}`. Objective: validation {spec.metric} "
             f"({spec.direction}). Trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ".", ""]
    if best:
        params = ", ".join(f"{s.name}={_fmt(best[s.name])}" for s in spec.spaces)
        lines += [f"Best: trial {best['trial']}, {spec.metric} {best['objective']:.4f} ({params}).", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in table:
        lines.append("| " + " | ".join(_fmt(r[c]).replace("|", "/") for c in columns) + " |")
    lines += ["", "Objective of pruned trials: the last value they reported.", "",
              "![objective against each parameter](objective.png)", "", "![training and validation curves](curves.png)", ""]
    path = os.path.join(spec.sweep_dir, "results.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _log_y(ax) -> None:
    """Log scale with plain tick labels (20, 50, 100 rather than 2x10^1)."""
    import matplotlib.ticker
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)


def _log_axis(values) -> bool:
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return bool(nums) and len(nums) == len(values) and min(nums) > 0 and max(nums) / min(nums) >= 10


def plot_objective(table, spec, out_png: str) -> str:
    """One panel per parameter: completed trials as dots, pruned ones as crosses (last value)."""
    plt = _pyplot()
    n = len(spec.spaces)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
    done = [r for r in table if r["objective"] is not None]
    for ax, space in zip(axes[0], spec.spaces):
        xs = [r[space.name] for r in done]
        categorical = any(isinstance(x, str) or x is None or isinstance(x, bool) for x in xs)
        if categorical:
            labels = sorted({repr(x) for x in xs})
            pos = {lab: i for i, lab in enumerate(labels)}
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize="small")
        for state, marker, colour in (("COMPLETE", "o", "tab:blue"), ("PRUNED", "x", "tab:orange")):
            sel = [r for r in done if r["state"] == state]
            if sel:
                x = [pos[repr(r[space.name])] if categorical else r[space.name] for r in sel]
                ax.scatter(x, [r["objective"] for r in sel], marker=marker, color=colour,
                           label=state.lower())
        if not categorical and (space.kind.endswith("log_uniform") or _log_axis(xs)):
            ax.set_xscale("log")
        if _log_axis([r["objective"] for r in done]):
            _log_y(ax)
        ax.set_xlabel(space.name)
        ax.set_ylabel(f"validation {spec.metric}")
        ax.grid(True, alpha=0.3)
        if done:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no finished trials", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


def plot_curves(table, spec, out_png: str) -> str:
    """Training loss and validation metric of every trial, labelled by trial number and params."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = 0
    for i, r in enumerate(sorted(table, key=lambda r: r["trial"])):
        data = _curves(r["model_dir"])
        if not data:
            continue
        label = f"#{r['trial']} " + " ".join(f"{s.name.split('.')[-1]}={_fmt(r[s.name])}" for s in spec.spaces)
        colour = colours[i % len(colours)]
        style = "-" if r["state"] == "COMPLETE" else ":"
        for ax, split, metric in ((axes[0][0], "train", "loss"), (axes[0][1], "eval", spec.metric)):
            curves = data.get(split, {})
            if metric in curves:
                ax.plot(*curves[metric], style, color=colour, label=label,
                        marker="o" if split == "eval" else None, markersize=3)
        drawn += 1
    for ax, title in ((axes[0][0], "training loss"), (axes[0][1], f"validation {spec.metric}")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        lines = ax.get_lines()
        if lines and all(v > 0 for line in lines for v in line.get_ydata()) and "perplexity" in title:
            _log_y(ax)
        if lines and drawn <= 16:
            ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png
