"""Which mesh fits T5.1.1-XXL and an 8-expert MoE into 16 / 32 GiB per chip on 256 chips?

Each row is one `python -m t5x_like.main precompile` (a fresh process: the fake device count is
fixed when JAX starts). Results are appended to results.jsonl; `--table` prints the README tables.

    python experiments/precompile/run.py fit        # the 256-chip mesh table
    python experiments/precompile/run.py moe        # only the MoE rows of that table
    python experiments/precompile/run.py microbatches  # MoE rows again with 2 microbatches
    python experiments/precompile/run.py capacity capacity_microbatches  # the capacity path (comparison)
    python experiments/precompile/run.py scaling    # per-device param+optimizer bytes vs fsdp=N
    python experiments/precompile/run.py --table
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(HERE, "results.jsonl")
GiB = 1024 ** 3

T5 = ("t5_1_1_xxl", os.path.join(HERE, "t5_1_1_xxl.gin"), "{'inputs': 512, 'targets': 114}")
# (name, gin file, lengths[, extra gin flags]). moe_8x: the default dropless, expert-parallel MoE
# (its rows of 2026-11-23 in results.jsonl are the capacity path, then the default);
# moe_8x_capacity: GShard/Switch one-hot dispatch, capacity factor 1.25, for comparison.
MOE = ("moe_8x", os.path.join(HERE, "moe_8x.gin"), "{'targets': 1024}")
MOE_CAPACITY = ("moe_8x_capacity", MOE[1], MOE[2], ("--gin.DecoderOnlyConfig.moe_impl='capacity'",))
# (model, mesh axes), all on 256 chips, global batch 512 sequences (2 per chip).
MOE_MESHES = (dict(expert=8, data=32), dict(expert=8, fsdp=32), dict(fsdp=256), dict(expert=8, fsdp=8, tensor=4))
MOE_MICROBATCH_MESHES = (dict(expert=8, fsdp=32), dict(expert=8, fsdp=8, tensor=4))
FIT = [(m, mesh) for m in (T5,) for mesh in (
    dict(data=256), dict(fsdp=256), dict(data=16, fsdp=16), dict(data=64, fsdp=4),
    dict(fsdp=64, tensor=4), dict(data=4, fsdp=16, tensor=4))] + [(MOE, mesh) for mesh in MOE_MESHES]
FIT_BATCH = 512
SCALING_N = (8, 16, 32, 64, 128, 256)


def _run_measured(cmd) -> tuple[str, str, int]:
    """stdout, stderr and the peak resident bytes of the compile process (this host's RAM)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True,
                                env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
        _, _, usage = os.wait4(proc.pid, 0)
        out.seek(0), err.seek(0)
        return out.read(), err.read(), usage.ru_maxrss * 1024  # Linux: KiB


def run_one(model, mesh: dict, devices: int, batch: int, tag: str, microbatches: int = 1) -> dict:
    name, gin_file, lengths, *extra = model
    axes = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, **mesh}
    cmd = [sys.executable, "-m", "t5x_like.main", "precompile", f"--gin_file={gin_file}",
           "--gin_file=runs/precompile.gin", f"--gin.NUM_FAKE_DEVICES={devices}", f"--gin.BATCH_SIZE={batch}",
           f"--gin.TASK_FEATURE_LENGTHS={lengths}", f"--gin.precompile.num_microbatches={microbatches}"]
    cmd += [f"--gin.create_mesh.{k}={v}" for k, v in axes.items()] + list(extra[0] if extra else ())
    print(" ".join(cmd[1:]), flush=True)
    start = time.time()
    stdout, stderr, rss = _run_measured(cmd)
    line = next((x for x in stdout.splitlines() if x.startswith("REPORT ")), None)
    if line is None:
        rec = {"error": (stderr.strip().splitlines() or ["?"])[-1][:300]}
    else:
        rec = json.loads(line[len("REPORT "):])
    rec.update(name=name, tag=tag, mesh_request=axes, wall_s=round(time.time() - start, 1),
               host_rss_gib=round(rss / GiB, 2),
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
    if "moe" in argv:  # only the MoE rows of the fit table
        for mesh in MOE_MESHES:
            run_one(MOE, mesh, 256, FIT_BATCH, "fit")
    if "microbatches" in argv:  # the MoE meshes that missed 16 GiB, with half the activations
        for mesh in MOE_MICROBATCH_MESHES:
            run_one(MOE, mesh, 256, FIT_BATCH, "fit", microbatches=2)
    if "capacity" in argv:  # the capacity path on the same meshes, for comparison
        for mesh in MOE_MESHES:
            run_one(MOE_CAPACITY, mesh, 256, FIT_BATCH, "fit")
    if "capacity_microbatches" in argv:
        for mesh in MOE_MICROBATCH_MESHES:
            run_one(MOE_CAPACITY, mesh, 256, FIT_BATCH, "fit", microbatches=2)
    if "scaling" in argv:
        for n in SCALING_N:
            run_one(T5, dict(fsdp=n), n, 256, "scaling")
    print(table())


if __name__ == "__main__":
    main(sys.argv[1:])
