"""The training loop end to end: every family learns, runs resume bitwise after SIGKILL, SIGTERM
saves and exits, NaN stops the run with the last good checkpoint intact, eval and plot modes."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from t5x_like.models import DecoderOnlyConfig, DecoderOnlyModel, EncoderDecoderConfig, EncoderDecoderModel
from t5x_like.models import EncoderOnlyConfig, EncoderOnlyModel
from t5x_like.training import checkpointing, optimizers, trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(vocab_size=384, d_model=64, num_heads=4, head_dim=16, mlp_dim=128)  # byte vocab: 359 ids


def read_jsonl(run_dir, split="train"):
    """{step: record}, the last record of a step winning (a resumed run re-logs steps)."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec["split"] == split:
                out[rec["step"]] = rec
    return out


@pytest.mark.parametrize("family", ["lm", "prefix_lm", "span_corruption", "mlm"])
def test_each_family_learns_and_reports_perplexity(family, tmp_path):
    if family in ("lm", "prefix_lm"):
        model = DecoderOnlyModel(DecoderOnlyConfig(num_layers=2, position_embedding="rotary",
                                                   mlp_activations=("silu", "linear"), **TINY))
    elif family == "span_corruption":
        model = EncoderDecoderModel(EncoderDecoderConfig(num_encoder_layers=2, num_decoder_layers=2, **TINY))
    else:
        model = EncoderOnlyModel(EncoderOnlyConfig(num_layers=2, position_embedding="learned", norm_type="layer",
                                                   norm_position="post", use_bias=True, **TINY))
    lengths = {"lm": {"targets": 64}, "prefix_lm": {"inputs": 32, "targets": 32},
               "span_corruption": {"inputs": 64, "targets": 14}, "mlm": {"inputs": 64, "targets": 64}}[family]
    results = trainer.train(model=model, model_dir=str(tmp_path), mixture_or_task_name=f"embedded_{family}_byte",
                            task_feature_lengths=lengths, train_steps=40, batch_size=8,
                            optimizer=optimizers.adamw(3e-3, warmup_steps=5, decay_steps=40),
                            log_every=10, eval_every=40, eval_batches=2, checkpoint_every=40,
                            measure_peak=False, progress=False)
    train = read_jsonl(tmp_path)
    assert train[40]["loss"] < 0.8 * train[10]["loss"], (train[10]["loss"], train[40]["loss"])
    (values,) = results.values()
    assert 1.0 < values["perplexity"] < 359 and values["tokens"] > 0
    assert read_jsonl(tmp_path, "eval")[40]["perplexity"] == pytest.approx(values["perplexity"])
    assert os.path.isdir(tmp_path / "checkpoints" / "40")
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "train"))


TINY_RUN_GIN = os.path.join(REPO, "tests", "tiny_lm_run.gin")


def cli_args(model_dir, steps=24, extra=()):
    return [sys.executable, "-m", "t5x_like.main", "train", f"--gin_file={TINY_RUN_GIN}",
            f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
            "--gin.DecoderOnlyConfig.dropout_rate=0.1", "--gin.train.checkpoint_every=4", *extra]


def run_cli(args, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, **kw)


def start_cli(args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out")


def final_params(run_dir):
    return checkpointing.restore_params(os.path.join(run_dir, "checkpoints"))


def logged_steps(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    return set(read_jsonl(run_dir)) if os.path.exists(path) else set()


@pytest.mark.slow
def test_sigkill_then_rerun_is_bitwise_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = start_cli(cli_args(killed))
    # Kill once a checkpoint past the first exists and training has moved beyond it.
    wait_for(lambda: os.path.isdir(killed / "checkpoints" / "8") and max(logged_steps(killed), default=0) >= 10,
             proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(logged_steps(killed)) < 24
    resumed = run_cli(cli_args(killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = run_cli(cli_args(straight))
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = read_jsonl(straight), read_jsonl(killed)
    assert sorted(a) == sorted(b) == list(range(1, 25))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a]
    pa, pb = final_params(straight), final_params(killed)
    for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_sigterm_saves_and_exits_then_resumes(tmp_path):
    proc = start_cli(cli_args(tmp_path, steps=200))
    wait_for(lambda: max(logged_steps(tmp_path), default=0) >= 6, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("stopped:")]
    assert line and "SIGTERM: saved step" in line[0] and "rerun the same command" in line[0]
    step = int(line[0].split("saved step ")[1].split()[0])
    assert str(step) in os.listdir(tmp_path / "checkpoints")
    resumed = run_cli(cli_args(tmp_path, steps=step + 2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max(logged_steps(tmp_path)) == step + 2


@pytest.mark.slow
def test_nan_stops_with_clear_error_and_good_checkpoint(tmp_path):
    diverge = ["--gin_file=optimizers/adamw.gin", "--gin.adamw.peak_learning_rate=1e30",
               "--gin.adamw.warmup_steps=2", "--gin.adamw.max_grad_norm=None", "--gin.train.checkpoint_every=1000"]
    proc = run_cli(cli_args(tmp_path, steps=30, extra=diverge))
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "became NaN/Inf at step" in err[0] and "is intact" in err[0], proc.stderr[-2000:]
    bad_step = int(err[0].split("at step ")[1].split(";")[0])
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert steps and max(steps) < bad_step
    params = final_params(tmp_path)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(params))


@pytest.mark.slow
def test_eval_mode_matches_training_eval_and_plot(tmp_path):
    run = tmp_path / "run"
    extra = ["--gin.train.eval_every=12", "--gin.train.eval_batches=2", "--gin.train.checkpoint_every=12"]
    assert run_cli(cli_args(run, steps=12, extra=extra)).returncode == 0
    expected = read_jsonl(run, "eval")[12]["perplexity"]
    proc = run_cli([sys.executable, "-m", "t5x_like.main", "eval", "--gin_file=models/llama_tiny.gin",
                    "--gin_file=runs/eval.gin", f"--gin.CHECKPOINT_DIR='{run}'",
                    "--gin.MIXTURE_OR_TASK_NAME='embedded_lm_byte'", "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
                    "--gin.BATCH_SIZE=8", "--gin.EVAL_BATCHES=2", "--gin.DecoderOnlyConfig.num_layers=2",
                    "--gin.DecoderOnlyConfig.vocab_size=384", "--gin.DecoderOnlyConfig.d_model=64",
                    "--gin.DecoderOnlyConfig.head_dim=16", "--gin.DecoderOnlyConfig.mlp_dim=128"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("validation embedded_lm_byte")][0]
    got = float(line.split("perplexity=")[1].split()[0])
    assert got == pytest.approx(expected, rel=1e-4)

    png = tmp_path / "curves.png"
    proc = run_cli([sys.executable, "-m", "t5x_like.main", "plot", f"--run_dir={run}", f"--output={png}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.stat().st_size > 1000


def test_finetune_starts_from_another_runs_params(tmp_path):
    model = DecoderOnlyModel(DecoderOnlyConfig(num_layers=2, position_embedding="rotary", **TINY))
    common = dict(model=model, mixture_or_task_name="embedded_lm_byte", task_feature_lengths={"targets": 64},
                  batch_size=8, log_every=1, eval_every=0, measure_peak=False, progress=False)
    trainer.train(model_dir=str(tmp_path / "pre"), train_steps=30, checkpoint_every=30,
                  optimizer=optimizers.adamw(3e-3, warmup_steps=5, decay_steps=30), **common)
    trainer.train(model_dir=str(tmp_path / "fine"), train_steps=2, checkpoint_every=2,
                  init_checkpoint=str(tmp_path / "pre"),
                  optimizer=optimizers.adafactor(schedule=optimizers.constant_schedule(1e-3)), **common)
    trainer.train(model_dir=str(tmp_path / "fresh"), train_steps=2, checkpoint_every=2,
                  optimizer=optimizers.adafactor(schedule=optimizers.constant_schedule(1e-3)), **common)
    pre, fine, fresh = (read_jsonl(tmp_path / n) for n in ("pre", "fine", "fresh"))
    # The fine-tuned run's first loss continues the pretrained curve, far below a fresh start.
    assert fine[1]["loss"] < 0.8 * fresh[1]["loss"]
    assert abs(fine[1]["loss"] - pre[30]["loss"]) < 0.25 * pre[30]["loss"]
    assert sorted(int(s) for s in os.listdir(tmp_path / "fine" / "checkpoints") if s.isdigit())[-1] == 2


def train_rows(run_dir):
    """Every train record of metrics.jsonl in file order, repeats included."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


def committed_steps(run_dir):
    return sorted(int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints")) if s.isdigit())


@pytest.mark.slow
def test_sigkill_then_rerun_logs_each_step_once(tmp_path):
    every10 = ["--gin.train.checkpoint_every=10"]
    proc = start_cli(cli_args(tmp_path, steps=30, extra=every10))
    # Kill a few steps past the checkpoint of step 10, well before the next one (step 20).
    wait_for(lambda: os.path.isdir(tmp_path / "checkpoints" / "10") and max(logged_steps(tmp_path), default=0) >= 13,
             proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last_checkpoint, last_logged = max(committed_steps(tmp_path)), max(logged_steps(tmp_path))
    assert last_checkpoint < last_logged < 30, (last_checkpoint, last_logged)  # steps to be logged again
    resumed = run_cli(cli_args(tmp_path, steps=30, extra=every10))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in train_rows(tmp_path)] == list(range(1, 31))


@pytest.mark.slow
def test_two_trains_on_one_dir_the_second_fails_in_one_line(tmp_path):
    shared, solo = tmp_path / "shared", tmp_path / "solo"
    first = start_cli(cli_args(shared, steps=40))
    try:
        wait_for(lambda: os.path.exists(shared / ".lock") and (shared / ".lock").read_text().strip(), first)
        second = run_cli(cli_args(shared, steps=40))
        assert first.poll() is None, "the first run ended before the second started; lengthen it"
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"pid {first.pid} on host " in errors[0] and " since " in errors[0] and str(shared) in errors[0]
        _, err = first.communicate(timeout=900)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err[-3000:]
    assert run_cli(cli_args(solo, steps=40)).returncode == 0
    a, b = train_rows(shared), train_rows(solo)
    assert [r["step"] for r in a] == list(range(1, 41))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    for x, y in zip(jax.tree_util.tree_leaves(final_params(shared)), jax.tree_util.tree_leaves(final_params(solo))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert (shared / ".lock").read_text() == ""


@pytest.mark.slow
def test_every_process_of_a_multi_host_run_stops_on_a_locked_dir(tmp_path):
    import socket

    from t5x_like.training.run_lock import RunLock

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    args = cli_args(tmp_path, steps=4) + ["--gin.create_mesh.data=2", "--gin.create_mesh.fsdp=4",
                                          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    with RunLock(tmp_path):
        procs = [subprocess.Popen(args + [f"--process_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        try:
            errs = [p.communicate(timeout=300)[1] for p in procs]
        finally:
            for p in procs:
                p.kill()
    for i, (p, err) in enumerate(zip(procs, errs)):
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert p.returncode == 2 and len(lines) == 1, (i, err[-3000:])
        assert (f"pid {os.getpid()} on host" if i == 0 else "process 0 could not lock") in lines[0]
    assert not os.path.exists(tmp_path / "checkpoints") and not os.path.exists(tmp_path / "metrics.jsonl")
