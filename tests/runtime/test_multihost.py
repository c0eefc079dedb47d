"""Multi-device and multi-host training: the same run gives the same losses on every mesh, two
processes joined by jax.distributed match one process, a dead peer stops the others, and the
precompile mode reports per-device memory without allocating the model."""

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from t5x_like import partitioning
from t5x_like.runtime import distributed
from t5x_like.models import DecoderOnlyConfig, DecoderOnlyModel
from t5x_like.training import checkpointing, optimizers, trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(vocab_size=384, d_model=64, num_heads=4, head_dim=16, mlp_dim=128, num_layers=2,
            position_embedding="rotary", mlp_activations=("silu", "linear"), dropout_rate=0.0)


def read_losses(run_dir):
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec["split"] == "train":
                out[rec["step"]] = rec["loss"]
    return out


MESHES = {
    "1": lambda: partitioning.create_mesh(devices=jax.devices()[:1]),
    "data=8": functools.partial(partitioning.create_mesh, data=8),
    "fsdp=8": functools.partial(partitioning.create_mesh, data=1, fsdp=8),
    "data=2,tensor=4": functools.partial(partitioning.create_mesh, data=2, tensor=4),
}


@pytest.mark.slow  # four 20-step runs, each compiled: about a minute on 2 cores
def test_same_losses_on_every_mesh(tmp_path):
    assert jax.device_count() == 8
    losses = {}
    for name, mesh_fn in MESHES.items():
        run_dir = tmp_path / name.replace(",", "_").replace("=", "")
        trainer.train(model=DecoderOnlyModel(DecoderOnlyConfig(**TINY)), model_dir=str(run_dir),
                      mixture_or_task_name="embedded_lm_byte", task_feature_lengths={"targets": 64},
                      train_steps=20, batch_size=8, mesh_fn=mesh_fn, dropout=False,
                      optimizer=optimizers.adamw(3e-3, warmup_steps=5, decay_steps=20),
                      log_every=1, eval_every=0, checkpoint_every=100, measure_peak=False, progress=False)
        losses[name] = read_losses(run_dir)
    reference = np.array([losses["1"][s] for s in range(1, 21)])
    assert reference[-1] < reference[0]
    for name, values in losses.items():
        got = np.array([values[s] for s in range(1, 21)])
        np.testing.assert_allclose(got, reference, rtol=1e-5, err_msg=f"mesh {name} vs 1 device")


def test_distributed_settings_from_flags_and_env(monkeypatch):
    for name in ("T5X_LIKE_COORDINATOR_ADDRESS", "T5X_LIKE_NUM_PROCESSES", "T5X_LIKE_PROCESS_ID",
                 "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.settings() is None
    assert distributed.settings(num_processes=1) is None
    assert distributed.settings("h:1", 2, 1) == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
    monkeypatch.setenv("T5X_LIKE_COORDINATOR_ADDRESS", "h:2")
    monkeypatch.setenv("T5X_LIKE_NUM_PROCESSES", "4")
    monkeypatch.setenv("T5X_LIKE_PROCESS_ID", "3")
    assert distributed.settings() == {"coordinator_address": "h:2", "num_processes": 4, "process_id": 3}
    assert distributed.settings(process_id=0)["process_id"] == 0  # flags win over the environment
    monkeypatch.delenv("T5X_LIKE_PROCESS_ID")
    with pytest.raises(distributed.DistributedError, match="missing"):
        distributed.settings()
    with pytest.raises(distributed.DistributedError, match="outside"):
        distributed.settings(process_id=4)


def test_host_rows_slices_of_the_global_stream_concatenate_to_it():
    import seqio
    from t5x_like.data import iterators
    kw = dict(mixture_or_task_name="embedded_lm_byte", task_feature_lengths={"targets": 32}, batch_size=8, seed=3)
    whole = iterators.get_iterator(shard_info=seqio.ShardInfo(0, 1), **kw)
    halves = [iterators.get_iterator(host_rows=rows, **kw) for rows in ((0, 4), (4, 8))]
    for _ in range(2):
        full, a, b = next(whole), next(halves[0]), next(halves[1])
        for k in full:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), full[k])
    assert halves[1].state()["config"]["host_rows"] == [4, 8]
    mesh = partitioning.create_mesh(data=2, tensor=4)
    assert partitioning.host_rows_of(mesh, 16) == (0, 16)  # one process holds every row


# --- two processes on 127.0.0.1 -------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_args(model_dir, steps=20, extra=()):
    return [sys.executable, "-m", "t5x_like.main", "train",
            f"--gin_file={os.path.join(REPO, 'tests', 'tiny_lm_run.gin')}",
            f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}", "--gin.train.dropout=False",
            "--gin.train.checkpoint_every=10", "--gin.create_mesh.data=2", "--gin.create_mesh.fsdp=4",
            "--gin.train.host_data='slice'", *extra]


def env_with_devices(n, **extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
                **extra)


def start_hosts(model_dir, steps=20, extra=(), env_extra=None):
    port = free_port()
    env = env_with_devices(4, **(env_extra or {}))
    return [subprocess.Popen(cli_args(model_dir, steps, extra) + [
        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoint_restores_in_one(tmp_path):
    evals = ("--gin.train.eval_every=20", "--gin.train.eval_batches=2")  # multi-host eval must not hang
    procs = start_hosts(tmp_path / "two", extra=evals)
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-5000:]
    one = subprocess.run(cli_args(tmp_path / "one", extra=evals), cwd=REPO, env=env_with_devices(8),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-5000:]

    two_losses, one_losses = read_losses(tmp_path / "two"), read_losses(tmp_path / "one")
    assert sorted(two_losses) == list(range(1, 21))
    np.testing.assert_allclose([two_losses[s] for s in range(1, 21)], [one_losses[s] for s in range(1, 21)],
                               rtol=1e-5)
    # Only process 0 wrote logs and configs; both wrote the checkpoint collectively.
    with open(tmp_path / "two" / "metrics.jsonl") as f:
        assert sum(1 for line in f if '"split": "train"' in line) == 20
    assert os.path.isfile(tmp_path / "two" / "operative_config.gin")
    # The 2-process checkpoint restores in this single process, equal to the 1-process run's.
    params_two = checkpointing.restore_params(str(tmp_path / "two" / "checkpoints"), step=20)
    params_one = checkpointing.restore_params(str(tmp_path / "one" / "checkpoints"), step=20)
    for a, b in zip(jax.tree_util.tree_leaves(params_two), jax.tree_util.tree_leaves(params_one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_dead_peer_stops_the_other_within_bounded_time(tmp_path, victim):
    """SIGKILL one host mid-run (the coordinator too): the survivor must exit non-zero, naming the
    failure, within about the heartbeat timeout, instead of waiting in a collective forever."""
    procs = start_hosts(tmp_path / "run", steps=100000, env_extra={"T5X_LIKE_HEARTBEAT_TIMEOUT_S": "10"})
    survivor = procs[1 - victim]
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 300
        while not (metrics.exists() and metrics.stat().st_size > 0):  # training has started
            assert time.time() < deadline and procs[0].poll() is None, procs[0].communicate()[1][-5000:]
            time.sleep(1)
        procs[victim].send_signal(signal.SIGKILL)
        killed_at = time.time()
        _, err = survivor.communicate(timeout=120)
        elapsed = time.time() - killed_at
    finally:
        for p in procs:
            p.kill()
    reasons = [line[:400] for line in err.splitlines() if re.match(r"(error:|F\d{4} )", line)]
    print(f"survivor exited with {survivor.returncode} after {elapsed:.1f}s: {reasons}")
    assert survivor.returncode != 0
    assert elapsed < 120
    # A collective failing (the usual case) gives our one-line error and status 3; a survivor not
    # in a collective is stopped by the coordination service's heartbeat check (abseil fatal log).
    assert reasons, err[-5000:]
    if survivor.returncode == 3:
        assert "another process died" in reasons[-1]
