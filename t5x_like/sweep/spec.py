"""A sweep's YAML spec: what to train (gin files, fixed bindings), what to vary (spaces), the
budget, objective, sampler, pruner and storage. `load_spec` checks the structure, `check_gin` the
gin names and values against the base files; both raise SweepSpecError with one clear line
before any trial starts. The keys are documented in configs/README.md.

The bottom of the sweep package: report.py and worker.py import this module, it imports neither.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from typing import Any, Optional

from t5x_like.errors import UserError

SPACE_KINDS = ("grid", "choice", "uniform", "log_uniform", "int_uniform", "int_log_uniform")
TOP_KEYS = ("study", "gin_files", "bindings", "parameters", "budget", "objective", "sampler", "pruner",
            "storage", "sweep_dir", "heartbeat")
SECTION_KEYS = {
    "budget": ("n_trials", "timeout_s"),
    "objective": ("metric", "task", "direction"),
    "sampler": ("kind", "seed"),
    "pruner": ("kind", "n_startup_trials", "n_warmup_steps", "interval_steps", "percentile"),
    "heartbeat": ("interval_s", "grace_s", "max_retry"),
}


class SweepSpecError(UserError):
    """A sweep spec that cannot run; the message names the key and what to do."""


def _read_yaml(path: str):
    """YAML 1.1 reads `1e-3` (no dot) as a string; learning rates are written that way, so floats
    without a dot resolve as floats here. (pyyaml comes with the `sweep` extra: imported lazily.)"""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                       |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                       |\.[0-9_]+(?:[eE][-+][0-9]+)?
                       |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."))
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=Loader)
    except yaml.YAMLError as e:
        raise SweepSpecError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def gin_literal(value) -> str:
    """A YAML value as gin text: strings starting with @ or % are references, others are quoted."""
    if isinstance(value, str) and value[:1] in ("@", "%"):
        return value
    return repr(value)


def safe_url(url: str) -> str:
    """The storage URL without its password, for logs and reports."""
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


@dataclasses.dataclass(frozen=True)
class Space:
    """One varied gin binding and the values Optuna may give it."""
    name: str
    kind: str
    values: tuple = ()
    low: Any = None
    high: Any = None

    @classmethod
    def parse(cls, name: str, raw) -> "Space":
        where = f"parameters.{name}"
        if not isinstance(raw, dict) or len(raw) != 1:
            raise SweepSpecError(f"{where}: give exactly one space, e.g. {{grid: [1, 2]}} or "
                                 f"{{log_uniform: [1e-4, 1e-2]}} (kinds: {', '.join(SPACE_KINDS)})")
        ((kind, arg),) = raw.items()
        if kind not in SPACE_KINDS:
            raise SweepSpecError(f"{where}: unknown space kind {kind!r}; use one of {', '.join(SPACE_KINDS)}")
        if kind in ("grid", "choice"):
            if not isinstance(arg, list) or not arg:
                raise SweepSpecError(f"{where}: {kind} needs a non-empty list of values")
            bad = [v for v in arg if not (v is None or isinstance(v, (bool, int, float, str)))]
            if bad:
                raise SweepSpecError(f"{where}: {kind} values must be numbers, strings, booleans or null, "
                                     f"got {bad[0]!r} (write a gin reference as a string '@name()')")
            if len(set(map(repr, arg))) != len(arg):
                raise SweepSpecError(f"{where}: {kind} lists a value twice")
            return cls(name, kind, values=tuple(arg))
        if isinstance(arg, dict) and set(arg) == {"low", "high"}:
            low, high = arg["low"], arg["high"]
        elif isinstance(arg, list) and len(arg) == 2:
            low, high = arg
        else:
            raise SweepSpecError(f"{where}: {kind} needs [low, high] or {{low: ..., high: ...}}")
        integer = kind.startswith("int_")
        for bound in (low, high):
            if not _is_number(bound) or (integer and not isinstance(bound, int)):
                raise SweepSpecError(f"{where}: {kind} bounds must be {'integers' if integer else 'numbers'}, "
                                     f"got {bound!r}")
        if not low < high:
            raise SweepSpecError(f"{where}: {kind} needs low < high, got low={low} high={high}")
        if kind.endswith("log_uniform") and low <= 0:
            raise SweepSpecError(f"{where}: {kind} needs low > 0, got {low}")
        return cls(name, kind, low=low, high=high)

    def candidate_values(self) -> tuple:
        """Values to check against gin before any trial runs."""
        return self.values if self.values else (self.low, self.high)

    def suggest(self, trial):
        if self.kind in ("grid", "choice"):
            return trial.suggest_categorical(self.name, list(self.values))
        log_scale = self.kind.endswith("log_uniform")
        if self.kind.startswith("int_"):
            return trial.suggest_int(self.name, self.low, self.high, log=log_scale)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=log_scale)


@dataclasses.dataclass(frozen=True)
class Spec:
    path: str
    study: str
    gin_files: tuple
    bindings: tuple          # fixed "NAME = VALUE" gin lines
    spaces: tuple            # Space, in spec order
    n_trials: Optional[int]
    timeout_s: Optional[float]
    metric: str = "perplexity"
    task: Optional[str] = None
    direction: str = "minimize"
    sampler: str = "auto"
    seed: Optional[int] = None
    pruner: dict = dataclasses.field(default_factory=dict)
    storage: str = ""
    sweep_dir: str = ""
    heartbeat_s: int = 60
    grace_s: int = 180
    max_retry: int = 3

    @property
    def is_grid(self) -> bool:
        return all(s.kind == "grid" for s in self.spaces)

    def grid_points(self) -> list[dict]:
        """Every grid point in spec order (the last parameter varies fastest), up to n_trials."""
        points = [dict(zip([s.name for s in self.spaces], combo))
                  for combo in itertools.product(*[s.values for s in self.spaces])]
        return points[:self.n_trials] if self.n_trials else points


def _section(raw: dict, key: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise SweepSpecError(f"{key}: expected a mapping with keys {', '.join(SECTION_KEYS[key])}")
    unknown = sorted(set(value) - set(SECTION_KEYS[key]))
    if unknown:
        raise SweepSpecError(f"{key}: unknown key {unknown[0]!r}; known: {', '.join(SECTION_KEYS[key])}")
    return value


def _positive(section: str, key: str, value, integer: bool = True, allow_zero: bool = False):
    if value is None:
        return None
    ok = (isinstance(value, int) if integer else _is_number(value)) and not isinstance(value, bool)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise SweepSpecError(f"{section}.{key}: expected a {'non-negative' if allow_zero else 'positive'} "
                             f"{'integer' if integer else 'number'}, got {value!r}")
    return value


def load_spec(path: str, storage: Optional[str] = None, sweep_dir: Optional[str] = None,
              extra_bindings=()) -> Spec:
    """Read and check the spec's structure (gin names are checked by `check_gin`)."""
    if not os.path.isfile(path):
        raise SweepSpecError(f"sweep spec {path!r} not found")
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise SweepSpecError(f"{path}: expected a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise SweepSpecError(f"{path}: unknown key {unknown[0]!r}; known keys: {', '.join(TOP_KEYS)}")

    study = raw.get("study") or os.path.splitext(os.path.basename(path))[0]
    gin_files = raw.get("gin_files") or []
    if isinstance(gin_files, str):
        gin_files = [gin_files]
    if not gin_files or not all(isinstance(f, str) for f in gin_files):
        raise SweepSpecError("gin_files: list the base gin files (at least one), e.g. [tests/tiny_lm_run.gin]")
    fixed = raw.get("bindings") or {}
    if not isinstance(fixed, dict):
        raise SweepSpecError("bindings: expected a mapping NAME: VALUE of fixed gin bindings")
    params = raw.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepSpecError("parameters: give at least one gin binding to vary, "
                             "e.g. {adamw.peak_learning_rate: {grid: [1e-3, 3e-3]}}")
    for name in list(fixed) + list(params):
        if name == "MODEL_DIR":
            raise SweepSpecError("MODEL_DIR is set per trial by the sweep (<sweep_dir>/trials/<number>); remove it")
    both = sorted(set(fixed) & set(params))
    if both:
        raise SweepSpecError(f"{both[0]} is both fixed (bindings) and varied (parameters); keep one")
    spaces = tuple(Space.parse(str(name), space) for name, space in params.items())

    budget, objective = _section(raw, "budget"), _section(raw, "objective")
    sampler, pruner, heartbeat = _section(raw, "sampler"), _section(raw, "pruner"), _section(raw, "heartbeat")
    n_trials = _positive("budget", "n_trials", budget.get("n_trials"))
    timeout_s = _positive("budget", "timeout_s", budget.get("timeout_s"), integer=False)
    direction = objective.get("direction", "minimize")
    if direction not in ("minimize", "maximize"):
        raise SweepSpecError(f"objective.direction: {direction!r}; use minimize or maximize")
    metric = objective.get("metric", "perplexity")
    if not isinstance(metric, str):
        raise SweepSpecError(f"objective.metric: expected a metric name such as perplexity, got {metric!r}")
    kind = sampler.get("kind", "auto")
    if kind not in ("auto", "grid", "tpe", "random"):
        raise SweepSpecError(f"sampler.kind: {kind!r}; use auto, grid, tpe or random")
    grid = [s.name for s in spaces if s.kind == "grid"]
    if grid and len(grid) != len(spaces):
        raise SweepSpecError(f"parameters: grid ({grid[0]}) cannot be mixed with other space kinds; "
                             "use choice for a categorical parameter of a TPE or random sweep")
    if kind == "grid" and not grid:
        raise SweepSpecError("sampler.kind: grid needs every parameter to be a grid space")
    if kind in ("tpe", "random") and grid:
        raise SweepSpecError(f"sampler.kind: {kind} cannot sample grid spaces; use choice instead of grid")
    if not grid and not n_trials and not timeout_s:
        raise SweepSpecError("budget: a non-grid sweep needs n_trials and/or timeout_s")
    seed = sampler.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise SweepSpecError(f"sampler.seed: expected an integer, got {seed!r}")
    pkind = pruner.get("kind", "median")
    if pkind not in ("none", "median", "percentile"):
        raise SweepSpecError(f"pruner.kind: {pkind!r}; use median, percentile or none")
    for key in ("n_startup_trials", "n_warmup_steps", "interval_steps"):
        _positive("pruner", key, pruner.get(key), allow_zero=key != "interval_steps")
    if "percentile" in pruner and not (_is_number(pruner["percentile"]) and 0 < pruner["percentile"] < 100):
        raise SweepSpecError(f"pruner.percentile: expected a number in (0, 100), got {pruner['percentile']!r}")
    for key in ("interval_s", "grace_s"):
        _positive("heartbeat", key, heartbeat.get(key))
    _positive("heartbeat", "max_retry", heartbeat.get("max_retry"), allow_zero=True)

    sweep_dir = os.path.abspath(sweep_dir or raw.get("sweep_dir") or os.path.join("runs", "sweeps", study))
    storage = storage or raw.get("storage") or f"sqlite:///{os.path.join(sweep_dir, 'study.db')}"
    if not isinstance(storage, str) or "://" not in storage:
        raise SweepSpecError(f"storage: {storage!r} is not an SQLAlchemy URL (sqlite:///path.db, "
                             "postgresql://user:pass@host/db)")
    lines = tuple(f"{name} = {gin_literal(value)}" for name, value in fixed.items()) + tuple(extra_bindings)
    return Spec(path=path, study=str(study), gin_files=tuple(gin_files), bindings=lines, spaces=spaces,
                n_trials=n_trials, timeout_s=timeout_s, metric=metric, task=objective.get("task"),
                direction=direction, sampler=kind, seed=seed, pruner={"kind": pkind, **pruner},
                storage=storage, sweep_dir=sweep_dir, heartbeat_s=heartbeat.get("interval_s", 60),
                grace_s=heartbeat.get("grace_s", 180), max_retry=heartbeat.get("max_retry", 3))


def check_gin(spec: Spec) -> None:
    """Every fixed and varied binding must name something the base gin files configure, and every
    candidate value must parse: checked in a scratch parse before any trial starts."""
    import gin

    from t5x_like import gin_config

    try:
        gin_config.parse(spec.gin_files, [])
    except gin_config.GinConfigError as e:
        raise SweepSpecError(f"gin_files: {e}") from None
    try:
        checks = [(line.split("=", 1)[0].strip(), line) for line in spec.bindings]
        checks += [(s.name, f"{s.name} = {gin_literal(v)}") for s in spec.spaces for v in s.candidate_values()]
        for name, line in checks:
            if not re.fullmatch(r"[\w./]+", name):
                raise SweepSpecError(f"binding {line!r}: {name!r} is not a gin name (Configurable.param or MACRO)")
            if "." not in name:   # a macro: the base files must define it, else nothing reads it
                try:
                    gin.query_parameter(f"%{name}")
                except ValueError:
                    raise SweepSpecError(f"unknown gin macro {name!r}: the base gin files do not define it "
                                         "(check the spelling, e.g. TRAIN_STEPS)") from None
            try:
                gin.parse_config(line)
            except Exception as e:  # gin raises ValueError, SyntaxError, KeyError... for bad lines
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise SweepSpecError(f"binding {line!r}: {msg} (check it against the base gin files)") from None
    finally:
        gin.clear_config()
