"""precompile: per-device memory and FLOPs of the train step from abstract arrays."""

import json
import os
import subprocess
import sys

import jax
import pytest

from t5x_like import partitioning
from t5x_like.models import DecoderOnlyConfig, DecoderOnlyModel
from t5x_like.training import optimizers, precompile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = DecoderOnlyModel(DecoderOnlyConfig(vocab_size=512, d_model=128, num_heads=4, head_dim=32, mlp_dim=512,
                                           num_layers=2, position_embedding="rotary", scan_layers=True))


def test_param_and_optimizer_bytes_shrink_as_one_over_n_with_fsdp():
    reports = {}
    for n in (1, 2, 4, 8):
        mesh_fn = lambda n=n: partitioning.create_mesh(data=1, fsdp=n, devices=jax.devices()[:n])  # noqa: E731
        reports[n] = precompile.precompile(MODEL, task_feature_lengths={"targets": 32}, batch_size=8,
                                           optimizer=optimizers.adamw(1e-3), mesh_fn=mesh_fn)
    full = reports[1]["param_plus_opt_bytes_per_device"]
    assert full > 3 * 4 * reports[1]["params"] * 0.99  # adam: params + mu + nu in float32
    for n, r in reports.items():
        assert r["param_plus_opt_bytes_per_device"] == pytest.approx(full / n, rel=0.01), n
        assert r["argument_bytes"] >= r["param_plus_opt_bytes_per_device"]
        assert r["temp_bytes"] > 0 and r["flops_per_device"] > 0 and r["model_flops_per_step"] > 0
    assert "per device" in precompile.format_report(reports[8])


def test_precompile_mode_on_more_fake_devices_than_the_machine_has():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run([sys.executable, "-m", "t5x_like.main", "precompile", "--gin_file=models/t5_1_1_tiny.gin",
                           "--gin_file=runs/precompile.gin", "--gin.NUM_FAKE_DEVICES=32", "--gin.BATCH_SIZE=32",
                           "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
                           "--gin.EncoderDecoderConfig.scan_layers=True",
                           "--gin.create_mesh.fsdp=8", "--gin.create_mesh.data=4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))[len("REPORT "):])
    assert report["devices"] == 32 and report["mesh"]["fsdp"] == 8 and report["mesh"]["data"] == 4
    assert "temporaries" in proc.stdout and "FLOPs" in proc.stdout
