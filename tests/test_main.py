"""The command line: demo, import_hf end to end, and one-line errors with a non-zero exit."""

import os
import subprocess
import sys

import numpy as np
import pytest

from t5x_like import gin_config, main
from t5x_like.interop import hf
from t5x_like.runtime import quiet_startup
from t5x_like.training import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env_updates=None):
    """The real command line in a subprocess, with the user's environment: no TF_CPP_MIN_LOG_LEVEL
    (tests/conftest.py sets one for this process), so start-up quietness is main.py's doing."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_updates or {}))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "t5x_like.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


START_UP_NOISE = ("oneDNN", "cuda drivers", "cuInit", "absl::InitializeLog", "Logging before flag parsing")


def test_demo_runs_each_family_from_gin(capsys):
    small = ["--gin.EncoderDecoderConfig.vocab_size=512", "--gin.DecoderOnlyConfig.vocab_size=512",
             "--gin.EncoderOnlyConfig.vocab_size=512"]
    for f in ("models/t5_1_1_tiny.gin", "models/gpt2_tiny.gin", "models/llama_tiny.gin", "models/bert_tiny.gin"):
        assert main.main(["demo", f"--gin_file={f}", *small]) == 0
    out = capsys.readouterr().out
    for family in ("EncoderDecoderModel", "DecoderOnlyModel", "EncoderOnlyModel"):
        assert family in out


@pytest.mark.parametrize("args, expected", [
    (["demo", "--gin_file=does_not_exist.gin"], "gin file 'does_not_exist.gin' not found"),
    (["demo", "--gin_file=models/llama_tiny.gin", "--gin.DecoderOnlyConfig.no_such_field=1"],
     "doesn't have a parameter named 'no_such_field'"),
    (["demo", "--gin_file=models/llama_tiny.gin", "--gin.DecoderOnlyConfig.num_kv_heads=3"],
     "num_heads=8 is not a multiple of num_kv_heads=3"),
    (["import_hf", "--hf_dir=/nonexistent/dir", "--output_dir=/tmp/x"], "/nonexistent/dir is not a directory"),
    (["demo", "--bogus=1"], "unknown argument '--bogus=1'"),
])
def test_user_errors_are_one_line(args, expected, capsys):
    """In-process through main.main (tests/test_cli_errors.py has the full table)."""
    assert main.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


def test_import_hf_writes_checkpoint_and_gin(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf", safe_serialization=True)

    out = tmp_path / "imported"
    assert main.main(["import_hf", f"--hf_dir={tmp_path / 'hf'}", f"--output_dir={out}"]) == 0
    gin_config.parse([str(out / "model.gin")])
    model = gin_config.model_from_gin()
    params = checkpointing.restore_params(out / "checkpoints")

    ref_model, ref_vars = hf.load(tmp_path / "hf")
    assert model.config == ref_model.config
    tokens = np.random.default_rng(0).integers(1, 128, (2, 12), dtype=np.int32)
    batch = {"decoder_input_tokens": tokens}
    np.testing.assert_array_equal(model.compute_logits({"params": params}, batch),
                                  ref_model.compute_logits(ref_vars, batch))
    # A second import into the same place refuses rather than overwriting.
    assert main.main(["import_hf", f"--hf_dir={tmp_path / 'hf'}", f"--output_dir={out}"]) == 2


def test_missing_required_macro_is_one_line():
    """The real command line: exactly one line on stderr, no TensorFlow / absl / CUDA start-up lines."""
    proc = run_cli("train", "--gin_file=models/llama_tiny.gin", "--gin_file=runs/pretrain.gin", "--gin.TRAIN_STEPS=5")
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), proc.stderr
    assert "missing required gin macro(s) MODEL_DIR, MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS" in err[0]
    assert "--gin.MODEL_DIR=..." in err[0]


@pytest.mark.slow
def test_verbose_shows_start_up_logging():
    """--verbose keeps TensorFlow's start-up lines (the same command without it has none: above)."""
    proc = run_cli("train", "--verbose", "--gin_file=models/llama_tiny.gin", "--gin_file=runs/pretrain.gin",
                   "--gin.TRAIN_STEPS=5")
    assert proc.returncode == 2
    assert any(noise in proc.stderr for noise in START_UP_NOISE), proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: missing required gin macro(s)")


@pytest.mark.slow
def test_quiet_start_up_keeps_python_warnings():
    """Silencing TensorFlow's import leaves Python warnings (and the project's log warnings) alone."""
    code = ("import logging, warnings; from t5x_like.runtime import quiet_startup; quiet_startup.quiet_startup(); import tensorflow; "
            "warnings.warn('a project warning'); logging.getLogger('t5x_like.x').warning('a project log line')")
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "a project warning" in proc.stderr and "a project log line" in proc.stderr
    assert not any(noise in proc.stderr for noise in START_UP_NOISE), proc.stderr


def test_quiet_start_up_hides_orbax_shutdown_noise():
    """Exceptions Python cannot raise (garbage-collected coroutines of an abandoned Orbax restore)
    are not printed; others still are."""
    import types

    quiet_startup.quiet_startup()
    assert isinstance(sys.unraisablehook, quiet_startup.QuietUnraisableHook)
    seen = []
    hook = quiet_startup.QuietUnraisableHook(seen.append)
    orbax_code = types.SimpleNamespace(co_filename=os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "x.py"))
    hook(types.SimpleNamespace(object=types.SimpleNamespace(cr_code=orbax_code), exc_traceback=None))
    other = types.SimpleNamespace(object=None, exc_traceback=None)
    hook(other)
    assert seen == [other]


def test_orbax_chatter_filter_keeps_errors_and_other_loggers():
    import logging

    orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "checkpoint_manager.py")
    record = lambda level, path: logging.LogRecord("absl", level, path, 1, "msg", None, None)  # noqa: E731
    keep = quiet_startup.OrbaxChatterFilter().filter
    assert not keep(record(logging.WARNING, orbax_file)) and not keep(record(logging.INFO, orbax_file))
    assert keep(record(logging.ERROR, orbax_file)) and keep(record(logging.WARNING, "/work/t5x_like/x.py"))
