"""Run values checked before anything is built, compiled or written (`train`, `evaluate`, `precompile`).

A wrong type or range (`TRAIN_STEPS='ten'`, `BATCH_SIZE=0`), task feature lengths that are not
positive integers, rows longer than the model can read (a learned position table,
`BaseModel.max_length`), or a step whose activations cannot fit in memory would otherwise fail
after minutes of data loading and compilation, or quietly do nothing. Each check raises a
one-line `RunValueError` naming the gin macro (or binding) and the fix.

The memory check is a lower bound, so it never refuses a step that fits: the activations one step
must hold at once, from the model config alone (each layer's input kept for the backward pass,
which even full rematerialisation keeps, plus one block of one layer's attention scores), compared
with the memory of this host's devices (host RAM on CPU).
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Mapping, Optional

from t5x_like.errors import UserError

GiB = 1024 ** 3


class RunValueError(UserError):
    """A run value (gin macro or binding) of the wrong type or range; the message names it and the fix."""


# (parameter, name the user sets, minimum (None: any integer), None allowed, what it is); names as in gin/runs/*.gin.
_INTS = {
    "train": (
        ("train_steps", "TRAIN_STEPS", 1, False, "the step to train to, e.g. --gin.TRAIN_STEPS=1000"),
        ("batch_size", "BATCH_SIZE", 1, False, "the global batch size in rows, e.g. --gin.BATCH_SIZE=32"),
        ("log_every", "train.log_every", 1, False, "steps between train metric lines"),
        ("eval_every", "train.eval_every", 0, False, "steps between evaluations (0: none)"),
        ("infer_eval_every", "train.infer_eval_every", 0, False,
         "steps between generate-and-score evaluations (0: none)"),
        ("eval_batches", "train.eval_batches", 1, True, "batches per evaluation (None: the whole split)"),
        ("checkpoint_every", "train.checkpoint_every", 0, False,
         "steps between checkpoints (0: only the last step)"),
        ("keep_last", "train.keep_last", 0, True, "checkpoints kept"),
        ("keep_best", "train.keep_best", 0, False, "best checkpoints kept"),
        ("num_microbatches", "train.num_microbatches", 1, False, "microbatches per step"),
        ("unigram_baseline_batches", "train.unigram_baseline_batches", 0, False, "batches counted (0: none)"),
        ("seed", "SEED", None, False, "the data and init seed"),
    ),
    "evaluate": (
        ("batch_size", "BATCH_SIZE", 1, False, "rows per evaluation batch, e.g. --gin.BATCH_SIZE=32"),
        ("eval_batches", "EVAL_BATCHES", 1, True, "batches to evaluate (None: the whole split)"),
        ("step", "evaluate.step", 0, True, "the checkpoint step (None: the latest)"),
        ("seed", "evaluate.seed", None, False, "the data seed"),
    ),
    "precompile": (
        ("batch_size", "BATCH_SIZE", 1, False, "the global batch size in rows, e.g. --gin.BATCH_SIZE=256"),
        ("num_microbatches", "precompile.num_microbatches", 1, False, "microbatches per step"),
    ),
}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value, name: str, minimum: Optional[int], what: str, allow_none: bool = False) -> None:
    """`value` must be an integer >= minimum (any integer when minimum is None; None when allowed)."""
    if value is None and allow_none:
        return
    if not _is_int(value) or (minimum is not None and value < minimum):
        bound = {None: "an integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        none = " or None" if allow_none else ""
        raise RunValueError(f"{name}={value!r} must be {bound}{none}: {what}")


def check_num_fake_devices(num) -> None:
    """precompile's NUM_FAKE_DEVICES: the number of fake CPU devices to lay the mesh over."""
    check_int(num, "NUM_FAKE_DEVICES", 1, "the number of fake CPU devices precompile lays the mesh over, "
              "e.g. --gin.NUM_FAKE_DEVICES=256")


def check_task_feature_lengths(lengths) -> dict[str, int]:
    """TASK_FEATURE_LENGTHS must map feature names to positive integers."""
    example = "e.g. --gin.TASK_FEATURE_LENGTHS=\"{'inputs': 512, 'targets': 114}\""
    if not isinstance(lengths, Mapping) or not lengths:
        raise RunValueError(f"TASK_FEATURE_LENGTHS={lengths!r} must be a dict of feature name -> length; {example}")
    for key, value in lengths.items():
        if not isinstance(key, str) or not _is_int(value) or value < 1:
            raise RunValueError(f"TASK_FEATURE_LENGTHS={dict(lengths)!r}: {key!r} -> {value!r} must be a feature "
                                f"name with a positive integer length; {example}")
    return {k: int(v) for k, v in lengths.items()}


def _row_lengths(model, lengths: Mapping[str, int]) -> Optional[dict[str, int]]:
    """The model's row length per feature, or None when the lengths lack a feature it needs (the
    task check names what is missing)."""
    try:
        return {k: int(v) for k, v in model.feature_lengths(lengths).items() if v is not None}
    except (KeyError, TypeError, NotImplementedError):
        return None


def check_max_length(model, lengths: Mapping[str, int]) -> None:
    """Rows must fit the positions the model can read (`BaseModel.max_length`)."""
    limit = model.max_length() if hasattr(model, "max_length") else None
    rows = _row_lengths(model, lengths)
    if limit is None or not rows:
        return
    feature, longest = max(rows.items(), key=lambda kv: kv[1])
    if longest > limit:
        raise RunValueError(f"TASK_FEATURE_LENGTHS={dict(lengths)!r} make rows of {longest} positions ({feature}) but "
                            f"{type(model).__name__} reads at most {limit} (its learned position table, "
                            f"max_position_embeddings={limit}); shorten TASK_FEATURE_LENGTHS")


def activation_bytes_lower_bound(model, row_lengths: Mapping[str, int], rows: int, training: bool) -> int:
    """Bytes one step must hold at once for `rows` rows (a lower bound; see the module docstring)."""
    cfg = model.config
    d_model, heads = int(getattr(cfg, "d_model", 0) or 0), int(getattr(cfg, "num_heads", 0) or 0)
    if not d_model or not row_lengths:
        return 0
    layers = sum(int(getattr(cfg, n, 0) or 0) for n in ("num_layers", "num_encoder_layers", "num_decoder_layers"))
    itemsize = 2 if getattr(cfg, "dtype", "float32") in ("bfloat16", "float16") else 4
    length = max(row_lengths.values())
    keys = min(length, getattr(cfg, "sliding_window", None) or length)
    scores = rows * heads * -(-length // 8) * keys  # at most 8 query blocks: the largest one of one layer
    hidden = rows * length * d_model * (max(layers, 1) if training else 1)
    return (scores + hidden) * itemsize


def memory_budget() -> tuple[Optional[int], str]:
    """(bytes, what) of memory this host's devices have: device memory on accelerators, RAM on CPU."""
    import jax

    devices = jax.local_devices()
    if devices and devices[0].platform != "cpu":
        try:
            limits = [int((d.memory_stats() or {}).get("bytes_limit", 0)) for d in devices]
        except Exception:  # noqa: BLE001 (memory_stats is optional for a backend)
            return None, ""
        return (sum(limits), f"the {len(devices)} local {devices[0].platform} device(s)") if all(limits) else (None, "")
    return host_memory_bytes(), "this host's memory"


def host_memory_bytes() -> Optional[int]:
    """Physical memory of this host (MemTotal of /proc/meminfo, else sysconf), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_step_memory(model, lengths: Mapping[str, int], batch_size: int, *, training: bool,
                      num_microbatches: int = 1) -> None:
    """Refuse a step whose activations alone cannot fit this host's device (or host) memory."""
    import jax

    row_lengths = _row_lengths(model, lengths)
    if not row_lengths:
        return
    rows = max(1, batch_size // max(1, jax.process_count()) // max(1, num_microbatches))
    need = activation_bytes_lower_bound(model, row_lengths, rows, training)
    budget, where = memory_budget()
    if budget and need > budget:
        fix = "shorten TASK_FEATURE_LENGTHS, lower BATCH_SIZE" + (" or raise num_microbatches" if training else "")
        step = "train" if training else "eval"
        raise RunValueError(f"one {step} step of {rows} rows x {max(row_lengths.values())} positions "
                            f"(BATCH_SIZE={batch_size}, TASK_FEATURE_LENGTHS={dict(lengths)!r}) needs at least "
                            f"{need / GiB:,.1f} GiB of activations but {where} has {budget / GiB:,.1f} GiB; {fix}")


def check_run(mode: str, values: Mapping[str, Any]) -> None:
    """Check the arguments of `train`, `evaluate` or `precompile` (`values`: the call's locals())."""
    for param, name, minimum, allow_none, what in _INTS[mode]:
        if param in values:
            check_int(values[param], name, minimum, what, allow_none)
    for param, name in (("model_dir", "MODEL_DIR"), ("checkpoint_dir", "CHECKPOINT_DIR")):
        if param in values and not isinstance(values[param], (str, os.PathLike)):
            raise RunValueError(f"{name}={values[param]!r} must be a path, e.g. --gin.{name}=\"'/tmp/run'\"")
    if values.get("host_data", "shard") not in ("shard", "slice"):
        raise RunValueError(f"train.host_data={values['host_data']!r}; use 'shard' (each host reads its own data "
                            "shard) or 'slice' (each host keeps its rows of the whole stream)")
    lengths = check_task_feature_lengths(values["task_feature_lengths"])
    batch_size, micro = values["batch_size"], values.get("num_microbatches", 1)
    if batch_size % micro:
        raise RunValueError(f"BATCH_SIZE={batch_size} is not divisible by num_microbatches={micro}; use a "
                            f"multiple of {micro}")
    name = values.get("mixture_or_task_name")
    if name is not None:
        from t5x_like.data import tasks as tasks_lib

        if not isinstance(name, str):
            raise RunValueError(f"MIXTURE_OR_TASK_NAME={name!r} must be a task or mixture name, e.g. "
                                "'embedded_lm_byte'")
        tasks_lib.check_task_feature_lengths(name, lengths)  # unknown task, missing or too-short lengths
    model = values.get("model")
    if model is None:
        return
    check_max_length(model, lengths)
    if mode in ("train", "evaluate"):
        check_step_memory(model, lengths, batch_size, training=mode == "train", num_microbatches=micro)


def make_model_dir(model_dir: str) -> None:
    """Create MODEL_DIR (and its parents); a path that cannot be a writable folder is a one-line error."""
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as e:
        raise RunValueError(f"MODEL_DIR={model_dir!r} cannot be created ({e.strerror or e}: "
                            f"{e.filename or model_dir}); choose a writable folder") from None
    if not os.access(model_dir, os.W_OK | os.X_OK):
        raise RunValueError(f"MODEL_DIR={model_dir!r} is not writable; choose a writable folder")
