"""RunLock: one run per MODEL_DIR. A second holder (this process or another) fails naming the
first; the lock of a dead, reused or long-silent holder is taken over; train() on a locked
directory fails before writing anything, and releases the lock however it ends."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from t5x_like.errors import UserError
from t5x_like.training import run_lock
from t5x_like.training.run_lock import LOCK_FILE, RunLock, RunLockedError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def holder_of(run_dir):
    text = (run_dir / LOCK_FILE).read_text()
    return json.loads(text) if text.strip() else None


def write_holder(run_dir, **changes):
    holder = {**run_lock.this_process(), **changes}
    (run_dir / LOCK_FILE).write_text(json.dumps(holder) + "\n")
    return holder


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_acquisition_in_this_process_fails_naming_the_holder(tmp_path):
    first = RunLock(tmp_path).acquire()
    recorded = holder_of(tmp_path)
    assert recorded["pid"] == os.getpid() and recorded["host"] == socket.gethostname()
    with pytest.raises(RunLockedError) as e:
        RunLock(tmp_path).acquire()
    message = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in message
    assert f"pid {os.getpid()} on host {socket.gethostname()} since {recorded['since']}" in message
    assert str(tmp_path) in message and "another MODEL_DIR" in message
    assert holder_of(tmp_path) == recorded  # the failed attempt changed nothing

    first.release()
    first.release()  # twice is harmless
    assert (tmp_path / LOCK_FILE).read_text() == ""  # empty: free
    with RunLock(tmp_path) as again:
        assert again.held and holder_of(tmp_path)["pid"] == os.getpid()
    assert not again.held


HOLD = ("import sys; from t5x_like.training.run_lock import RunLock; "
        "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); sys.stdin.read()")


def test_another_process_holds_it_until_it_is_killed(tmp_path, caplog):
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {child.pid} on host {socket.gethostname()} since "):
            RunLock(tmp_path).acquire()
    finally:
        child.kill()  # SIGKILL: no release, the file still names it
        child.wait()
    assert holder_of(tmp_path)["pid"] == child.pid
    with caplog.at_level("WARNING"), RunLock(tmp_path):
        assert holder_of(tmp_path)["pid"] == os.getpid()
    assert f"taking over the lock of pid {child.pid}" in caplog.text and "no longer runs" in caplog.text


def test_lock_file_of_a_dead_pid_on_this_host_is_taken_over(tmp_path):
    write_holder(tmp_path, pid=dead_pid())
    with RunLock(tmp_path):
        assert holder_of(tmp_path)["pid"] == os.getpid()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="process start times come from /proc")
def test_reused_pid_is_taken_over_but_a_live_holder_is_not(tmp_path):
    # Where flock is not enforced (some shared filesystems) only the recorded holder counts.
    me = write_holder(tmp_path)
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()} "):
        RunLock(tmp_path).acquire()
    write_holder(tmp_path, pid_start=me["pid_start"] - 1)  # this pid, but another process's start
    with RunLock(tmp_path):
        assert holder_of(tmp_path)["pid_start"] == me["pid_start"]


def test_holder_on_another_host_is_trusted_until_its_heartbeat_is_stale(tmp_path, monkeypatch):
    write_holder(tmp_path, host="node-elsewhere", pid=1)
    with pytest.raises(RunLockedError) as e:
        RunLock(tmp_path).acquire()
    assert "pid 1 on host node-elsewhere" in str(e.value) and "T5X_LIKE_BREAK_LOCK=1" in str(e.value)
    old = time.time() - run_lock.STALE_AFTER_S - 60
    os.utime(tmp_path / LOCK_FILE, (old, old))
    with RunLock(tmp_path):
        assert holder_of(tmp_path)["host"] == socket.gethostname()

    write_holder(tmp_path, host="node-elsewhere", pid=1)
    monkeypatch.setenv("T5X_LIKE_BREAK_LOCK", "1")
    with RunLock(tmp_path):
        assert holder_of(tmp_path)["pid"] == os.getpid()


def test_rebooted_machine_and_garbled_file_are_taken_over(tmp_path):
    if run_lock.this_process()["boot_id"]:
        write_holder(tmp_path, boot_id="another-boot")
        with RunLock(tmp_path):
            pass
    (tmp_path / LOCK_FILE).write_text('{"host": "x", "pi')
    with RunLock(tmp_path):
        assert holder_of(tmp_path)["pid"] == os.getpid()


def test_heartbeat_keeps_the_file_fresh(tmp_path):
    with RunLock(tmp_path, heartbeat_s=0.05):
        os.utime(tmp_path / LOCK_FILE, (0, 0))
        deadline = time.time() + 10
        while os.stat(tmp_path / LOCK_FILE).st_mtime < time.time() - 60 and time.time() < deadline:
            time.sleep(0.05)
        assert os.stat(tmp_path / LOCK_FILE).st_mtime > time.time() - 60


def test_other_processes_of_a_multi_host_run_do_not_lock(tmp_path):
    with RunLock(tmp_path, active=False) as lock:
        assert not lock.held
        with RunLock(tmp_path):  # process 0 still can
            pass


def digest(run_dir):
    out = {}
    for root, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, run_dir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def train_kwargs(run_dir, **over):
    from t5x_like.models import DecoderOnlyConfig, DecoderOnlyModel
    from t5x_like.training import optimizers
    model = DecoderOnlyModel(DecoderOnlyConfig(num_layers=1, vocab_size=384, d_model=32, num_heads=2, head_dim=16,
                                               mlp_dim=64))
    return {**dict(model=model, model_dir=str(run_dir), mixture_or_task_name="embedded_lm_byte",
                   task_feature_lengths={"targets": 32}, train_steps=2, batch_size=8,
                   optimizer=optimizers.adamw(1e-3, warmup_steps=1, decay_steps=2), log_every=1, eval_every=0,
                   checkpoint_every=2, measure_peak=False, progress=False), **over}


def test_train_on_a_locked_dir_fails_before_writing_anything(tmp_path):
    from t5x_like.training import trainer
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    (tmp_path / "checkpoints" / "4" / "state").write_bytes(b"\0" * 64)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 5.0}\n'
                                            '{"step": 9, "split": "train", "loss": 4.0}\n')
    (tmp_path / "config.gin").write_text("TRAIN_STEPS = 9\n")
    with RunLock(tmp_path):
        before = digest(tmp_path)
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host"):
            trainer.train(**train_kwargs(tmp_path))
        assert digest(tmp_path) == before


def test_train_releases_the_lock_when_it_fails(tmp_path):
    from t5x_like.training import trainer

    def broken_mesh():
        assert holder_of(tmp_path)["pid"] == os.getpid()  # called with the lock held
        raise RuntimeError("no mesh today")

    with pytest.raises(RuntimeError, match="no mesh today"):
        trainer.train(**train_kwargs(tmp_path, mesh_fn=broken_mesh))
    assert (tmp_path / LOCK_FILE).read_text() == ""
    with RunLock(tmp_path):
        pass


def test_lock_run_dir_in_one_process(tmp_path):
    lock = run_lock.lock_run_dir(str(tmp_path))
    try:
        assert lock.held and holder_of(tmp_path)["pid"] == os.getpid()
        with pytest.raises(RunLockedError):
            run_lock.lock_run_dir(str(tmp_path))
    finally:
        lock.release()
