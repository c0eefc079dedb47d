"""Hyperparameter sweeps on Optuna: a YAML spec names gin files, the gin bindings to vary and a
budget; every trial is a full `trainer.train` run in its own MODEL_DIR.

`python -m t5x_like.main sweep --spec=configs/NAME.yaml [--storage=URL] [--sweep_dir=DIR]`
runs one worker. Any number of workers, on one host or many, share a study through its storage:
SQLite in the sweep directory by default (one host), or any SQLAlchemy URL such as
`postgresql://user:pass@db-host/sweeps` (run the same command with the same `--storage` on every
host). The spec (spec.py) is documented in configs/README.md; the report is report.py.

Robustness, because sweeps run for days on preemptible machines:
- A trial that raises is FAIL with its one-line error as the `error` user attr; the sweep goes on.
- A worker killed mid-trial leaves it RUNNING. Each worker records its host and pid on its trials
  and, before every new trial, fails the RUNNING trials of dead workers on its own host at once;
  trials of other hosts fail once their Optuna heartbeat is stale. Either way the trial is
  re-enqueued (Optuna's retry callback) and the retry continues in the dead trial's MODEL_DIR from
  its last checkpoint. Finished trials are never rerun.
- Grid spaces are enqueued once as fixed trials; a trial whose parameters some lower-numbered
  live or finished trial already holds is skipped (FAIL, `skipped` user attr, left out of the
  results), so no grid point runs twice even when workers race. With SQLite a file lock makes
  the bookkeeping between trials atomic; other databases lock rows.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import threading
import time
import traceback
from typing import Optional

from t5x_like.sweep.report import CRASHED, SKIPPED, intended_params, write_report
from t5x_like.sweep.spec import Spec, SweepSpecError, check_gin, gin_literal, load_spec, safe_url

# -- the study --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    """Heartbeats and retries are "experimental" to Optuna, which also expects them under
    Study.optimize only; our ask-and-tell loop records heartbeats and fails stale trials itself."""
    import warnings

    import optuna
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        yield


def _retry_callback(max_retry: int):
    import optuna
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    with _quiet():
        return cls(max_retry=max_retry)


def open_storage(spec: Spec):
    """RDB storage with Optuna's heartbeat: a trial whose worker stops beating is failed and retried."""
    import inspect

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if spec.storage.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(os.path.abspath(spec.storage[len("sqlite:///"):])), exist_ok=True)
    kwargs = {"heartbeat_interval": spec.heartbeat_s, "grace_period": spec.grace_s}
    callback_arg = ("heartbeat_stale_trial_callback"
                    if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
                    else "failed_trial_callback")
    kwargs[callback_arg] = _retry_callback(spec.max_retry)
    engine = {"connect_args": {"timeout": 60}} if spec.storage.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(4):
        try:
            with _quiet():
                return optuna.storages.RDBStorage(_with_driver(spec.storage), engine_kwargs=engine, **kwargs)
        except ImportError as e:
            raise SweepSpecError(f"cannot open storage {safe_url(spec.storage)}: {e}") from None
        except Exception as e:  # sqlalchemy errors; workers starting together race to create the tables
            if attempt == 3:
                raise SweepSpecError(f"cannot open storage {safe_url(spec.storage)}: "
                                     f"{str(e).strip().splitlines()[0]}") from None
            time.sleep(1.0 + attempt)


def _with_driver(url: str) -> str:
    """`postgresql://` means psycopg (3) to SQLAlchemy 2.1 but psycopg2 to 2.0: name the driver
    that is installed (the `sweep` extra brings psycopg2)."""
    scheme, rest = url.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        try:
            import psycopg  # noqa: F401
            return f"postgresql+psycopg://{rest}"
        except ImportError:
            return f"postgresql+psycopg2://{rest}"
    return url


def _sampler(spec: Spec):
    import optuna
    if spec.is_grid:
        return _grid_sampler(spec)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed)


def _grid_sampler(spec: Spec):
    """Optuna's GridSampler without its `after_trial`, which stops the study once the grid looks
    exhausted: legal only inside Study.optimize, and on the way it reads the `grid_id` system attr
    that enqueued trials lack (telling the trial of a one-point grid raised KeyError: 'grid_id').
    The worker keeps its own budget (`_has_work`), so there is nothing to stop."""
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    return GridSampler({s.name: list(s.values) for s in spec.spaces}, seed=spec.seed)


def _pruner(spec: Spec):
    import optuna
    p = dict(spec.pruner)
    kind = p.pop("kind")
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "percentile":
        return optuna.pruners.PercentilePruner(p.pop("percentile", 25.0), **p)
    return optuna.pruners.MedianPruner(**p)


def open_study(spec: Spec):
    import optuna
    with _study_lock(spec):
        return optuna.create_study(study_name=spec.study, storage=open_storage(spec), sampler=_sampler(spec),
                                   pruner=_pruner(spec), direction=spec.direction, load_if_exists=True)


@contextlib.contextmanager
def _study_lock(spec: Spec):
    """SQLite reads and writes are not atomic across processes in Optuna: serialise a worker's
    bookkeeping (recovery, enqueueing, asking) with a file lock beside the database."""
    if not spec.storage.startswith("sqlite:///"):
        yield
        return
    import fcntl
    path = os.path.abspath(spec.storage[len("sqlite:///"):]) + ".lock"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _process_start(pid: int) -> Optional[str]:
    """Start time of a process (clock ticks since boot), to tell a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else fields[19]   # zombies are dead
    except (OSError, IndexError):
        return None


def _worker_alive(pid: int, started: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _process_start(pid)
    if os.path.isdir("/proc") and now is None:
        return False
    return started is None or now is None or now == started


def counts_toward_budget(trial) -> bool:
    """Live and finished trials count; skipped ones and those lost with their worker (retried) do not."""
    from optuna.trial import TrialState
    if trial.user_attrs.get(SKIPPED):
        return False
    return trial.state != TrialState.FAIL or bool(trial.user_attrs.get(CRASHED))


def recover_dead_trials(study, spec: Spec) -> list[int]:
    """Fail and re-enqueue RUNNING trials whose worker is gone: same-host workers by pid, others by
    Optuna's heartbeat. Returns the numbers failed here."""
    import optuna
    from optuna.trial import TrialState

    with contextlib.suppress(Exception), _quiet():
        optuna.storages.fail_stale_trials(study)
    storage, host, failed = study._storage, socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        a = t.user_attrs
        if a.get("worker_host") != host or a.get("worker_pid") in (None, os.getpid()):
            continue
        if _worker_alive(int(a["worker_pid"]), a.get("worker_started")):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "error", f"worker {host}:{a['worker_pid']} died; retried")
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue   # another worker got there first
        _retry_callback(spec.max_retry)(study, storage.get_trial(t._trial_id))
        failed.append(t.number)
    return failed


def enqueue_grid(study, spec: Spec) -> None:
    """Each grid point once, ever: a point that any trial holds (finished, failed or waiting) is
    not enqueued again, so a restarted worker never reruns one."""
    held = {tuple(sorted(intended_params(t).items(), key=lambda kv: kv[0]))
            for t in study.get_trials(deepcopy=False)}
    for point in spec.grid_points():
        if tuple(sorted(point.items())) not in held:
            study.enqueue_trial(point)


def _skip_reason(study, trial, spec: Spec) -> Optional[str]:
    """Why this freshly asked trial must not run (a racing duplicate, or beyond the budget)."""
    earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and counts_toward_budget(t)]
    if spec.is_grid:   # the lowest-numbered trial holding a point owns it, even if still waiting
        mine = trial.params
        for t in earlier:
            if intended_params(t) == mine:
                return f"duplicate of trial {t.number}"
        if spec.grid_points() and mine not in spec.grid_points():
            return "not a grid point of this spec"
    elif spec.n_trials and len(earlier) >= spec.n_trials:
        return f"over the budget of {spec.n_trials} trials"
    return None


def _has_work(study, spec: Spec) -> bool:
    from optuna.trial import TrialState
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    if spec.is_grid:
        return False
    return not spec.n_trials or sum(counts_toward_budget(t) for t in trials) < spec.n_trials


def trial_dir(spec: Spec, trial) -> str:
    """trials/<number>; a retry continues in the directory of the trial it retries (first of its
    retry history), resuming that run from its last checkpoint."""
    history = trial.system_attrs.get("retry_history") or []
    return os.path.join(spec.sweep_dir, "trials", str(history[0] if history else trial.number))


def objective_value(results: dict, spec: Spec) -> float:
    """The spec's metric from the trainer's {task: {metric: value}} eval results."""
    tasks = {k: v for k, v in results.items() if k != "unigram_baseline"}
    if not tasks:
        raise RuntimeError("the run reported no evaluation: set train.eval_every > 0 so trials have an objective")
    task = spec.task or ("all" if "all" in tasks else next(iter(tasks)))
    if task not in tasks or spec.metric not in tasks[task]:
        raise RuntimeError(f"no validation {spec.metric!r} for task {task!r} in {sorted(tasks)}")
    return float(tasks[task][spec.metric])


class _Heartbeat:
    """Records the trial's Optuna heartbeat every interval from a daemon thread."""

    def __init__(self, storage, trial_id: int, interval: int):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(storage, trial_id, interval), daemon=True)

    def _beat(self, storage, trial_id, interval):
        while True:
            with contextlib.suppress(Exception):
                storage.record_heartbeat(trial_id)
            if self._stop.wait(interval):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


def _train(spec: Spec, params: dict, model_dir: str, on_eval) -> dict:
    """One training run with gin re-parsed from the spec plus this trial's values."""
    import gin

    from t5x_like import gin_config
    from t5x_like.training import trainer

    lines = list(spec.bindings) + [f"{k} = {gin_literal(v)}" for k, v in params.items()]
    lines.append(f"MODEL_DIR = {model_dir!r}")
    gin_config.parse(spec.gin_files, lines)
    gin_config.check_required_macros()
    model = gin_config.model_from_gin()
    return trainer.train(model=model, gin_config_text=gin.config_str(), on_eval=on_eval)


def _one_line(e: BaseException) -> str:
    """The message without gin's "In call to configurable ..." suffix, on one line."""
    return " ".join(str(e).split("\n  In call to configurable")[0].split())


def run_trial(study, trial, spec: Spec, say=print) -> None:
    """Train one trial and tell Optuna how it ended; only a SIGTERM propagates (after a retry is
    enqueued, so the next worker continues the run)."""
    import gin
    import jax
    import optuna
    from optuna.trial import TrialState

    from t5x_like.training.trainer import TrainingInterrupted

    params, model_dir = trial.params, trial.user_attrs["model_dir"]
    os.makedirs(model_dir, exist_ok=True)

    def on_eval(step: int, results: dict) -> None:
        trial.report(objective_value(results, spec), step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}")

    say(f"trial {trial.number}: {params} -> {model_dir}")
    start = time.time()
    try:
        with _Heartbeat(study._storage, trial._trial_id, spec.heartbeat_s):
            results = _train(spec, params, model_dir, on_eval)
            value = objective_value(results, spec)
    except optuna.TrialPruned as e:
        study.tell(trial, state=TrialState.PRUNED)
        say(f"trial {trial.number}: {_one_line(e)} ({time.time() - start:.0f} s)")
    except (TrainingInterrupted, KeyboardInterrupt) as e:
        trial.set_user_attr("error", f"interrupted: {_one_line(e)}")
        study.tell(trial, state=TrialState.FAIL)
        _retry_callback(spec.max_retry)(study, study._storage.get_trial(trial._trial_id))
        raise
    except Exception as e:
        message = f"{type(e).__name__}: {_one_line(e)}"[:500]
        with open(os.path.join(model_dir, "error.txt"), "w") as f:
            f.write(traceback.format_exc())
        trial.set_user_attr("error", message)
        trial.set_user_attr(CRASHED, True)
        study.tell(trial, state=TrialState.FAIL)
        say(f"trial {trial.number}: FAIL {message}")
    else:
        study.tell(trial, value)
        say(f"trial {trial.number}: {spec.metric}={value:.4f} ({time.time() - start:.0f} s)")
    finally:
        gin.clear_config()
        jax.clear_caches()   # compiled steps of this trial's shapes are not reused


def worker_identity() -> dict:
    """User attrs that let a later worker on this host tell whether this one is still alive."""
    return {"worker_host": socket.gethostname(), "worker_pid": os.getpid(), "worker_started": _process_start(os.getpid())}


def claim_next_trial(study, spec: Spec):
    """The next trial this worker should run, with its parameters suggested, or None when the
    budget is spent. Skipped trials (racing duplicates, over budget) are told FAIL on the way."""
    from optuna.trial import TrialState

    while True:
        with _study_lock(spec):
            recover_dead_trials(study, spec)
            if not _has_work(study, spec):
                return None
            with _quiet():
                trial = study.ask()
            attrs = {**worker_identity(), "error": "",
                     "model_dir": trial_dir(spec, study._storage.get_trial(trial._trial_id))}
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
            for space in spec.spaces:
                space.suggest(trial)
            skip = _skip_reason(study, trial, spec)
            if not skip:
                return trial
            trial.set_user_attr(SKIPPED, skip)
            study.tell(trial, state=TrialState.FAIL)


def run_worker(spec: Spec, say=print) -> int:
    """Run trials until the study's budget (or this worker's timeout) is spent; returns how many
    trials this worker ran."""
    study = open_study(spec)
    deadline = time.time() + spec.timeout_s if spec.timeout_s else math.inf
    with _study_lock(spec):
        lost = recover_dead_trials(study, spec)
        if spec.is_grid:
            enqueue_grid(study, spec)
    if lost:
        say(f"retrying trials {lost} of dead workers")
    ran = 0
    while time.time() < deadline:
        trial = claim_next_trial(study, spec)
        if trial is None:
            break
        run_trial(study, trial, spec, say=say)
        ran += 1
    return ran


def run(spec_path: str, storage: Optional[str] = None, sweep_dir: Optional[str] = None, bindings=(),
        report_only: bool = False) -> str:
    """The `sweep` mode: check the spec, run this worker, write the report. Returns the report's path."""
    try:
        import optuna  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as e:
        raise SweepSpecError(f"sweeps need the `sweep` extra ({e.name} is missing): pip install -e '.[sweep]'") from None
    spec = load_spec(spec_path, storage=storage, sweep_dir=sweep_dir, extra_bindings=bindings)
    if report_only:
        missing = spec.storage.startswith("sqlite:///") and not os.path.isfile(spec.storage[len("sqlite:///"):])
        try:
            if missing:
                raise KeyError(spec.study)
            with _quiet():
                optuna.load_study(study_name=spec.study, storage=open_storage(spec))
        except KeyError:
            raise SweepSpecError(f"no study {spec.study!r} in {safe_url(spec.storage)}: run the sweep first") from None
    else:
        check_gin(spec)
        say = lambda msg: print(f"sweep {spec.study}: {msg}", file=sys.stderr, flush=True)  # noqa: E731
        say(f"storage {safe_url(spec.storage)}, directory {spec.sweep_dir}")
        run_worker(spec, say=say)
    study = open_study(spec)
    return write_report(study, spec)
