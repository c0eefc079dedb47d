"""The sweep worker: grid bookkeeping (no point twice, dead workers retried, a one-point grid), a
grid sweep end to end with a crashing and a pruned trial, SIGKILL-and-restart, and two workers
sharing one study on PostgreSQL."""

import contextlib
import csv
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

optuna = pytest.importorskip("optuna", reason="the sweep extra is not installed: pip install -e '.[sweep]'")
from optuna.trial import TrialState  # noqa: E402

from t5x_like import main as cli  # noqa: E402
from t5x_like.sweep import worker  # noqa: E402
from t5x_like.sweep.report import SKIPPED, intended_params  # noqa: E402
from t5x_like.sweep.spec import load_spec  # noqa: E402

from tiny_sweeps import LR, REPO, write_spec  # noqa: E402


def load(spec_path, storage=None):
    spec = load_spec(spec_path, storage=storage)
    return spec, optuna.load_study(study_name=spec.study, storage=worker.open_storage(spec))


def states_by_params(study):
    """{params: [states]} of the trials that ran (skipped duplicates left out)."""
    out = {}
    for t in study.get_trials():
        if not t.user_attrs.get(SKIPPED):
            out.setdefault(tuple(sorted(intended_params(t).items())), []).append(t.state)
    return out


def test_report_only_without_a_study_is_a_clear_error(tmp_path, capsys):
    path = write_spec(tmp_path, LR)
    assert cli.main(["sweep", f"--spec={path}", "--report_only"]) == 2
    assert "no study 't'" in capsys.readouterr().err and not os.path.exists(tmp_path / "sweep")


# -- bookkeeping without training -------------------------------------------------------------------

def test_racing_workers_never_claim_a_grid_point_twice(tmp_path):
    spec = load_spec(write_spec(tmp_path, {"adamw.peak_learning_rate": {"grid": [1e-3, 1e-2]},
                                                 "adamw.warmup_steps": {"grid": [0, 5]}}))
    study = worker.open_study(spec)
    worker.enqueue_grid(study, spec)
    for point in spec.grid_points()[:2]:   # a second worker enqueued at the same moment
        study.enqueue_trial(point)
    claimed = []
    while (trial := worker.claim_next_trial(study, spec)) is not None:
        claimed.append(tuple(sorted(trial.params.items())))
        study.tell(trial, 1.0)
    assert sorted(claimed) == sorted(tuple(sorted(p.items())) for p in spec.grid_points())
    skipped = [t for t in study.get_trials() if t.user_attrs.get(SKIPPED)]
    assert len(skipped) == 2 and all("duplicate of trial" in t.user_attrs[SKIPPED] for t in skipped)
    worker.enqueue_grid(study, spec)   # a restarted worker enqueues nothing new
    assert worker.claim_next_trial(study, spec) is None


def test_running_trial_of_dead_worker_is_failed_and_retried_in_its_directory(tmp_path):
    spec = load_spec(write_spec(tmp_path, LR))
    study = worker.open_study(spec)
    worker.enqueue_grid(study, spec)
    trial = worker.claim_next_trial(study, spec)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial.set_user_attr("worker_pid", dead.pid)   # as if that process had claimed it, then died
    assert worker.recover_dead_trials(study, spec) == [trial.number]
    failed = study.get_trials()[trial.number]
    assert failed.state == TrialState.FAIL and "died" in failed.user_attrs["error"]
    claimed = [worker.claim_next_trial(study, spec) for _ in range(2)]   # the other grid point, the retry
    assert worker.claim_next_trial(study, spec) is None
    (retry,) = [t for t in claimed if t.params == trial.params]
    assert retry.number > trial.number
    assert retry.user_attrs["model_dir"] == trial.user_attrs["model_dir"]   # resumes its checkpoints
    assert worker.recover_dead_trials(study, spec) == []   # our own running trials are left alone


def test_random_sweep_stops_at_its_budget(tmp_path):
    spec = load_spec(write_spec(tmp_path, {"adamw.peak_learning_rate": {"log_uniform": [1e-4, 1e-2]},
                                                 "adamw.warmup_steps": {"int_uniform": [0, 9]}},
                                      budget={"n_trials": 3}, sampler={"kind": "random", "seed": 0}))
    study = worker.open_study(spec)
    n = 0
    while (trial := worker.claim_next_trial(study, spec)) is not None:
        assert 1e-4 <= trial.params["adamw.peak_learning_rate"] <= 1e-2
        assert isinstance(trial.params["adamw.warmup_steps"], int)
        study.tell(trial, 1.0)
        n += 1
    assert n == 3


def test_one_point_grid_trial_is_told(tmp_path):
    """GridSampler.after_trial read the `grid_id` system attr that enqueued trials lack once one
    grid point looked unvisited: telling a one-point grid's trial raised KeyError: 'grid_id'."""
    spec = load_spec(write_spec(tmp_path, {"adamw.peak_learning_rate": {"grid": [1e-3]}}))
    study = worker.open_study(spec)
    worker.enqueue_grid(study, spec)
    trial = worker.claim_next_trial(study, spec)
    study.tell(trial, 1.0)
    assert worker.claim_next_trial(study, spec) is None
    assert [(t.state, t.params) for t in study.get_trials()] == [
        (TrialState.COMPLETE, {"adamw.peak_learning_rate": 1e-3})]


def test_worker_runs_a_one_point_grid(tmp_path, monkeypatch):
    """The worker loop (training stubbed out) through run_trial's `study.tell`, twice: the rerun
    finds the point done and runs nothing."""
    monkeypatch.setattr(worker, "_train", lambda spec, params, model_dir, on_eval: {"all": {"perplexity": 5.0}})
    spec = load_spec(write_spec(tmp_path, {"adamw.peak_learning_rate": {"grid": [1e-3]},
                                           "adamw.warmup_steps": {"grid": [0]}}))
    assert worker.run_worker(spec, say=lambda msg: None) == 1
    assert worker.run_worker(spec, say=lambda msg: None) == 0
    (trial,) = worker.open_study(spec).get_trials()
    assert trial.state == TrialState.COMPLETE and trial.value == 5.0


# -- end to end --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_grid_sweep_on_sqlite_reports_crash_and_prunes(tmp_path, capsys):
    """Grid lr x layers: layers=0 is an invalid model (FAIL with its error, the sweep goes on);
    lr=1e-5 is far behind lr=1e-2 at the first evaluation, so the median pruner stops it."""
    path = write_spec(tmp_path, {"adamw.peak_learning_rate": {"grid": [1e-2, 1e-5]},
                                 "DecoderOnlyConfig.num_layers": {"grid": [1, 0]}},
                      pruner={"kind": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
                      bindings={"TRAIN_STEPS": 10, "train.eval_every": 5, "train.eval_batches": 1,
                                "train.checkpoint_every": 10, "train.async_checkpoints": False,
                                "BATCH_SIZE": 8, "DecoderOnlyConfig.d_model": 32})
    assert cli.main(["sweep", f"--spec={path}"]) == 0
    sweep_dir = tmp_path / "sweep"
    assert (sweep_dir / "study.db").is_file()
    with open(sweep_dir / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["state"] for r in table] == ["COMPLETE", "PRUNED", "FAIL", "FAIL"]
    assert table[0]["adamw.peak_learning_rate"] == "0.01" and table[0]["steps"] == "10"
    assert table[1]["adamw.peak_learning_rate"] == "1e-05" and table[1]["steps"] == "5"
    assert float(table[1]["objective"]) > float(table[0]["objective"])
    assert all("num_layers must be positive" in r["error"] for r in table[2:])
    for r in table:   # every trial, pruned and failed too, keeps its directory
        assert os.path.isdir(r["model_dir"]) and r["model_dir"].endswith(f"trials/{r['trial']}")
    assert os.path.isfile(os.path.join(table[0]["model_dir"], "operative_config.gin"))
    assert "num_layers must be positive" in open(os.path.join(table[2]["model_dir"], "error.txt")).read()
    md = (sweep_dir / "results.md").read_text()
    assert f"Best: trial {table[0]['trial']}" in md and "| trial | state | objective |" in md
    for png in ("objective.png", "curves.png"):
        assert (sweep_dir / png).stat().st_size > 5000
    capsys.readouterr()
    # Rerunning the command runs nothing and rewrites the same report.
    assert cli.main(["sweep", f"--spec={path}"]) == 0
    assert "trial" not in capsys.readouterr().err
    assert len(optuna.load_study(study_name="t", storage=f"sqlite:///{sweep_dir}/study.db").trials) == 4


def cli_env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def start_worker(spec_path, *extra):
    return subprocess.Popen([sys.executable, "-m", "t5x_like.main", "sweep", f"--spec={spec_path}", *extra],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return err


@pytest.mark.slow
def test_sigkilled_worker_restarts_without_rerunning_finished_trials(tmp_path):
    path = write_spec(tmp_path, {"adamw.peak_learning_rate": {"grid": [1e-2, 3e-3, 1e-3]}},
                      bindings={"TRAIN_STEPS": 30, "train.eval_every": 10, "train.eval_batches": 1,
                                "train.checkpoint_every": 5, "train.async_checkpoints": False})
    trials = tmp_path / "sweep" / "trials"
    proc = start_worker(path)
    deadline = time.time() + 600
    # Kill once trial 0 is done and trial 1 has a checkpoint and has gone beyond it.
    while not (os.path.isdir(trials / "1" / "checkpoints" / "5")
               and sum(1 for _ in open(trials / "1" / "metrics.jsonl")) >= 8):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_log = (trials / "0" / "metrics.jsonl").read_text()
    spec, study = load(path)
    assert [t.state for t in study.trials[:2]] == [TrialState.COMPLETE, TrialState.RUNNING]

    err = finish(start_worker(path))
    assert "retrying trials [1] of dead workers" in err
    spec, study = load(path)
    assert all(states.count(TrialState.COMPLETE) == 1 for states in states_by_params(study).values())
    assert len(states_by_params(study)) == 3
    assert (trials / "0" / "metrics.jsonl").read_text() == first_log   # trial 0 never ran again
    assert sorted(os.listdir(trials)) == ["0", "1", "2"]                 # the retry resumed trials/1
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    resumed_steps = [int(line.split('"step": ')[1].split(",")[0]) for line in open(trials / "1" / "metrics.jsonl")
                     if '"split": "train"' in line]
    assert min(resumed_steps[8:]) > 5   # continued from its checkpoint at step 5 or later, not step 1


# -- PostgreSQL ---------------------------------------------------------------------------------------

def _postgres_binaries():
    for d in [os.path.dirname(shutil.which("initdb") or "")] + sorted(glob.glob("/usr/lib/postgresql/*/bin"))[::-1]:
        if d and all(os.access(os.path.join(d, b), os.X_OK) for b in ("initdb", "postgres")):
            return d
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_server(reason: str):
    """Skip, visibly; CI (.ci/run) installs PostgreSQL and sets T5X_LIKE_TEST_REQUIRE_POSTGRES=1, so
    there a server that cannot run is a failure."""
    if os.environ.get("T5X_LIKE_TEST_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL required (T5X_LIKE_TEST_REQUIRE_POSTGRES=1): {reason}")
    pytest.skip(f"no PostgreSQL server: {reason}")


@contextlib.contextmanager
def _postgres_server():
    """A throwaway server on 127.0.0.1; as root it runs as `nobody` (postgres refuses root)."""
    bindir = _postgres_binaries()
    if bindir is None:
        _no_server("install postgresql (initdb/postgres not found on PATH or in /usr/lib/postgresql/*/bin) "
                   "or set T5X_LIKE_TEST_POSTGRES_URL")
    root = tempfile.mkdtemp(prefix="t5x_like_pg_")
    as_user = []
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    port = _free_port()
    data = os.path.join(root, "data")
    init = subprocess.run(as_user + [f"{bindir}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                          capture_output=True, text=True)
    if init.returncode:
        shutil.rmtree(root, ignore_errors=True)
        _no_server(f"initdb failed: {init.stderr.strip()[-300:]}")
    pg_ctl = as_user + [f"{bindir}/pg_ctl", "-D", data]
    started = subprocess.run(pg_ctl + ["start", "-w", "-t", "60", "-l", os.path.join(root, "log"),
                                       "-o", f"-p {port} -h 127.0.0.1 -k {root}"], capture_output=True, text=True)
    try:
        if started.returncode:
            _no_server(f"postgres did not start: {started.stdout.strip()[-300:]}")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(pg_ctl + ["stop", "-m", "fast", "-w"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url():
    """A fresh database: on the server T5X_LIKE_TEST_POSTGRES_URL names, or on one started here."""
    try:
        import psycopg2
    except ImportError:
        _no_server("psycopg2 is not installed (pip install -e '.[sweep]')")
    with contextlib.ExitStack() as stack:
        url = os.environ.get("T5X_LIKE_TEST_POSTGRES_URL") or stack.enter_context(_postgres_server())
        name = f"sweep_{uuid.uuid4().hex[:12]}"
        conn = psycopg2.connect(url)
        conn.autocommit = True
        conn.cursor().execute(f"CREATE DATABASE {name}")
        yield url.rsplit("/", 1)[0] + "/" + name
        conn.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


@pytest.mark.slow
def test_two_workers_share_one_study_on_postgresql(tmp_path, postgres_url):
    path = write_spec(tmp_path, {"adamw.peak_learning_rate": {"grid": [1e-2, 1e-3]},
                                 "adamw.warmup_steps": {"grid": [0, 5]}})
    workers = [start_worker(path, f"--storage={postgres_url}") for _ in range(2)]
    try:
        for w in workers:
            finish(w)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    spec, study = load(path, storage=postgres_url)
    by_params = states_by_params(study)
    assert len(by_params) == 4 and all(s == [TrialState.COMPLETE] for s in by_params.values()), by_params
    ran = sorted(os.listdir(tmp_path / "sweep" / "trials"))
    assert len(ran) == 4   # no trial directory for a skipped duplicate
    assert "postgresql://postgres@127.0.0.1" in (tmp_path / "sweep" / "results.md").read_text()
