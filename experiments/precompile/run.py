"""Which mesh fits T5.1.1-XXL and an 8-expert MoE into 16 / 32 GiB per chip on 256 chips?

Each row is one `python -m t5x_like.main precompile` (a fresh process: the fake device count is
fixed when JAX starts). Results are appended to results.jsonl; `--table` prints the README tables.

    python experiments/precompile/run.py fit        # the 256-chip mesh table
    python experiments/precompile/run.py microbatches  # MoE rows again with 2 microbatches
    python experiments/precompile/run.py scaling    # per-device param+optimizer bytes vs fsdp=N
    python experiments/precompile/run.py --table
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(HERE, "results.jsonl")
GiB = 1024 ** 3

T5 = ("t5_1_1_xxl", os.path.join(HERE, "t5_1_1_xxl.gin"), "{'inputs': 512, 'targets': 114}")
MOE = ("moe_8x", os.path.join(HERE, "moe_8x.gin"), "{'targets': 1024}")
# (model, mesh axes), all on 256 chips, global batch 512 sequences (2 per chip).
FIT = [(m, mesh) for m in (T5,) for mesh in (
    dict(data=256), dict(fsdp=256), dict(data=16, fsdp=16), dict(data=64, fsdp=4),
    dict(fsdp=64, tensor=4), dict(data=4, fsdp=16, tensor=4))] + \
    [(MOE, mesh) for mesh in (dict(expert=8, data=32), dict(expert=8, fsdp=32), dict(fsdp=256),
                              dict(expert=8, fsdp=8, tensor=4))]
FIT_BATCH = 512
SCALING_N = (8, 16, 32, 64, 128, 256)


def run_one(model, mesh: dict, devices: int, batch: int, tag: str, microbatches: int = 1) -> dict:
    name, gin_file, lengths = model
    axes = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, **mesh}
    cmd = [sys.executable, "-m", "t5x_like.main", "precompile", f"--gin_file={gin_file}",
           "--gin_file=runs/precompile.gin", f"--gin.NUM_FAKE_DEVICES={devices}", f"--gin.BATCH_SIZE={batch}",
           f"--gin.TASK_FEATURE_LENGTHS={lengths}", f"--gin.precompile.num_microbatches={microbatches}"] + [f"--gin.create_mesh.{k}={v}" for k, v in axes.items()]
    print(" ".join(cmd[1:]), flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
    line = next((x for x in proc.stdout.splitlines() if x.startswith("REPORT ")), None)
    if line is None:
        rec = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    else:
        rec = json.loads(line[len("REPORT "):])
    rec.update(name=name, tag=tag, mesh_request=axes, wall_s=round(time.time() - start, 1),
               command="python -m " + " ".join(cmd[2:]))
    with open(RESULTS, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps({k: rec.get(k) for k in ("name", "mesh_request", "peak_bytes", "error", "wall_s")}), flush=True)
    return rec


def mesh_str(mesh: dict) -> str:
    return " x ".join(f"{k}={v}" for k, v in mesh.items() if v > 1) or "1"


def table() -> str:
    recs = [json.loads(x) for x in open(RESULTS)] if os.path.exists(RESULTS) else []
    latest = {}
    for r in recs:
        latest[(r["tag"], r["name"], json.dumps(r["mesh_request"], sort_keys=True), r.get("devices"),
                r.get("num_microbatches", 1))] = r
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    out = ["| model | mesh (256 chips) | microbatches | params+opt / chip | arguments | temporaries "
           "| peak / chip (GiB) | fits 16 GiB | fits 32 GiB | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (tag, name, _, _, micro), r in latest.items():
        if tag != "fit":
            continue
        if "error" in r:
            out.append(f"| {name} | {mesh_str(r['mesh_request'])} | {micro} | error: {r['error']} | | | | | | |")
            continue
        peak = r["peak_bytes"]
        out.append(f"| {name} ({r['params'] / 1e9:.1f}B) | {mesh_str(r['mesh'])} | {micro} "
                   f"| {g(r['param_plus_opt_bytes_per_device'])} "
                   f"| {g(r['argument_bytes'])} | {g(r['temp_bytes'])} | {g(peak)} | "
                   f"{'yes' if peak <= 16 * GiB else 'no'} | {'yes' if peak <= 32 * GiB else 'no'} | {r['compile_s']} |")
    out += ["", "| fsdp = N (devices) | params+opt / device (GiB) | x N (GiB) | arguments (GiB) | peak (GiB) |",
            "|---|---|---|---|---|"]
    for (tag, name, _, _, _), r in sorted(latest.items(), key=lambda kv: kv[1].get("devices", 0)):
        if tag == "scaling" and "error" not in r:
            po = r["param_plus_opt_bytes_per_device"]
            out.append(f"| {r['devices']} | {g(po)} | {g(po * r['devices'])} | {g(r['argument_bytes'])} | {g(r['peak_bytes'])} |")
    return "\n".join(out)


def main(argv) -> None:
    if "--table" in argv:
        print(table())
        return
    if "fit" in argv:
        for model, mesh in FIT:
            run_one(model, mesh, 256, FIT_BATCH, "fit")
    if "microbatches" in argv:  # the MoE meshes that missed 16 GiB, with half the activations
        for mesh in (dict(expert=8, fsdp=32), dict(expert=8, fsdp=8, tensor=4)):
            run_one(MOE, mesh, 256, FIT_BATCH, "fit", microbatches=2)
    if "scaling" in argv:
        for n in SCALING_N:
            run_one(T5, dict(fsdp=n), n, 256, "scaling")
    print(table())


if __name__ == "__main__":
    main(sys.argv[1:])
