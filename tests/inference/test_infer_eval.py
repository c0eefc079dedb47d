"""Generate-and-score evaluation (inference/generate_eval.py) on seqio tasks registered here with
seqio.TaskRegistry.add, the byte vocabulary and tiny random-init models: one predictions line per
example, finite metrics written under infer_eval/<task>, prompts laid out as in training, and the
task's metrics at 100 when the predictions are the targets."""

import json

import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_like.data import metrics
from t5x_like.data.vocabularies import get_vocabulary
from t5x_like.inference import InferEvalError, InferEvaluator, decoding
from t5x_like.inference.generate_eval import task_prompt
from t5x_like.models import DecoderOnlyConfig, EncoderDecoderConfig, EncoderOnlyConfig, model_for_config
from t5x_like.training.metrics_writer import MetricsWriter

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]
REVERSE, COPY, MIXTURE, NO_METRICS, SCORED = ("infer_eval_test_reverse", "infer_eval_test_copy", "infer_eval_test_mix",
                                              "infer_eval_test_no_metrics", "infer_eval_test_scored")
LENGTHS = {"inputs": 48, "targets": 48}
COMMON = dict(vocab_size=384, d_model=32, num_heads=2, head_dim=16, mlp_dim=64)


def examples(reverse: bool, n: int = 20):
    rng = np.random.default_rng(1 if reverse else 2)
    out = []
    for _ in range(n):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), 5)]
        out.append({"inputs": " ".join(words), "targets": " ".join(words[::-1] if reverse else words)})
    return out


def register(name, reverse, metric_fns):
    data = examples(reverse)

    def dataset_fn(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_tensor_slices({k: [ex[k] for ex in data] for k in ("inputs", "targets")})

    vocab = get_vocabulary("byte")
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(dataset_fn, splits=("train", "validation")),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features={"inputs": seqio.Feature(vocab, add_eos=True), "targets": seqio.Feature(vocab, add_eos=True)},
        postprocess_fn=lambda text, example=None, is_target=False: text.strip(), metric_fns=metric_fns)
    return data


@pytest.fixture(scope="module")
def tasks():
    data = {REVERSE: register(REVERSE, True, [metrics.exact_match, metrics.bleu]),
            COPY: register(COPY, False, [metrics.exact_match, metrics.bleu])}
    register(NO_METRICS, False, [])
    register(SCORED, True, [mean_log_likelihood])
    seqio.MixtureRegistry.remove(MIXTURE)
    seqio.MixtureRegistry.add(MIXTURE, [REVERSE, COPY], default_rate=1.0)
    return data


def mean_log_likelihood(targets, scores):
    """A score metric (seqio's (targets, scores) convention): the model scores each target."""
    return {"mean_log_likelihood": float(np.mean(scores))}


def tiny(config):
    """A model with random normal params (shapes traced, nothing compiled: init would compile)."""
    model = model_for_config(config)
    shapes = jax.eval_shape(lambda: model.init_variables(jax.random.key(0)))["params"]
    rng = np.random.default_rng(0)
    return model, jax.tree_util.tree_map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype), shapes)


ENC_DEC = EncoderDecoderConfig(num_encoder_layers=1, num_decoder_layers=1, **COMMON)
DEC = DecoderOnlyConfig(num_layers=1, position_embedding="rotary", **COMMON)


@pytest.fixture(scope="module")
def dec_eval(tasks, tmp_path_factory):
    """A decoder-only model's evaluator of the first 5 examples, by beam search."""
    out = tmp_path_factory.mktemp("dec")
    model, params = tiny(DEC)
    return InferEvaluator(model, REVERSE, LENGTHS, str(out), max_examples=5, batch_size=2, max_new_tokens=4,
                          method="beam", num_beams=2), params, out


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_encoder_decoder_over_a_mixture(tasks, tmp_path):
    model, params = tiny(ENC_DEC)
    ev = InferEvaluator(model, MIXTURE, LENGTHS, str(tmp_path), max_examples=10, batch_size=4, max_new_tokens=6)
    with MetricsWriter(str(tmp_path), progress=False, tensorboard=False) as writer:
        results = ev.evaluate(params, 7, writer=writer)
    assert set(results) == {REVERSE, COPY}
    for task, values in results.items():
        assert set(values) == {"exact_match", "bleu"} and all(np.isfinite(v) for v in values.values())
        rows = read_jsonl(tmp_path / "inference_eval" / f"{task}-7.jsonl")
        assert [r["index"] for r in rows] == list(range(10))  # 10 examples: batches of 4, the last padded
        assert [r["input"] for r in rows] == [ex["inputs"] for ex in tasks[task][:10]]
        assert [r["target"] for r in rows] == [ex["targets"] for ex in tasks[task][:10]]
        assert all(r["task"] == task and isinstance(r["prediction"], str) for r in rows)
    logged = {r["split"]: r for r in read_jsonl(tmp_path / "metrics.jsonl")}
    assert logged[f"infer_eval/{REVERSE}"]["step"] == 7
    assert logged[f"infer_eval/{REVERSE}"]["bleu"] == pytest.approx(results[REVERSE]["bleu"])

    # Each prediction is what decoding that example gives (the padding rows change nothing).
    vocab = get_vocabulary("byte")
    prompts = [list(vocab.encode(ex["inputs"])) + [1] for ex in tasks[REVERSE][:10]]
    batch = np.zeros((4, -(-max(len(p) for p in prompts) // 8) * 8), np.int32)  # the evaluator's batch shape
    for i, p in enumerate(prompts[:4]):
        batch[i, :len(p)] = p
    res = decoding.generate(model, {"params": params}, batch, max_new_tokens=6)
    rows = read_jsonl(tmp_path / "inference_eval" / f"{REVERSE}-7.jsonl")
    assert [r["output"] for r in rows[:4]] == [vocab.decode(t.tolist()) for t in res.tokens]


def test_decoder_only_beam_search(dec_eval):
    ev, params, out = dec_eval
    results = ev.evaluate(params, 0)
    assert all(np.isfinite(v) for v in results[REVERSE].values())
    assert len(read_jsonl(out / "inference_eval" / f"{REVERSE}-0.jsonl")) == 5


def test_prompts_are_laid_out_as_in_training():
    """Inputs end with EOS (add_eos): the encoder reads them as they are, a decoder-only model
    after its BOS (0), as its feature converter fed inputs then targets."""
    enc_dec, dec = model_for_config(ENC_DEC), model_for_config(DEC)
    assert task_prompt(enc_dec, [10, 11, 1], 0) == [10, 11, 1]
    assert task_prompt(dec, [10, 11, 1], 0) == [0, 10, 11, 1]
    assert task_prompt(enc_dec, [10, 11], 0) == [10, 11] and task_prompt(dec, [10, 11], 0) == [0, 10, 11]
    assert task_prompt(dec, [10, 11, 1], None) == [10, 11, 1]


def test_targets_as_predictions_score_100(dec_eval):
    """The mode's code path with a predict_fn that returns each example's targets."""
    ev, params, out = dec_eval
    targets = lambda ds: [(i, ex["targets"]) for i, ex in ds.as_numpy_iterator()]  # noqa: E731
    results = ev.evaluate(params, 3, predict_fn=targets)
    assert results[REVERSE] == {"exact_match": 100.0, "bleu": pytest.approx(100.0)}
    rows = read_jsonl(out / "inference_eval" / f"{REVERSE}-3.jsonl")
    assert len(rows) == 5 and all(r["prediction"] == r["target"] for r in rows)


def test_score_metrics_get_the_targets_log_likelihood(dec_eval, tasks):
    """Score metric_fns get log-likelihoods of the targets after the same prompts (evaluation.score_pairs)."""
    from t5x_like import evaluation

    _, params, _ = dec_eval
    model = model_for_config(DEC)
    results = InferEvaluator(model, SCORED, LENGTHS, max_examples=4, batch_size=4).evaluate(params)
    vocab = get_vocabulary("byte")
    prompts = [[0] + list(vocab.encode(ex["inputs"])) + [1] for ex in tasks[REVERSE][:4]]
    targets = [list(vocab.encode(ex["targets"])) + [1] for ex in tasks[REVERSE][:4]]
    want = evaluation.score_pairs(model, {"params": params}, prompts, targets, batch_size=4).mean()
    assert results[SCORED]["mean_log_likelihood"] == pytest.approx(want, rel=1e-5)


def test_unusable_tasks_and_models_are_user_errors(tasks):
    model = model_for_config(ENC_DEC)
    with pytest.raises(InferEvalError, match="has no metric_fns"):
        InferEvaluator(model, NO_METRICS, LENGTHS)
    with pytest.raises(InferEvalError, match="no seqio task or mixture 'no_such_task'"):
        InferEvaluator(model, "no_such_task", LENGTHS)
    with pytest.raises(InferEvalError, match="has no 'test' split"):
        InferEvaluator(model, REVERSE, LENGTHS, split="test")
    with pytest.raises(InferEvalError, match="cannot generate"):
        InferEvaluator(model_for_config(EncoderOnlyConfig(num_layers=1, **COMMON)), REVERSE, LENGTHS)


# ---------------------------------------------------------------- the command line

USER_MODULE = '''"""A user's seqio task with metrics: reverse the order of four words (byte vocabulary)."""
import seqio
import tensorflow as tf

from t5x_like.data import metrics, vocabularies

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def _source(split, shuffle_files=False, seed=None):
    n, offset = (64, 0) if split == "train" else (12, 3)
    words = [[WORDS[(i * 5 + offset + j) % len(WORDS)] for j in range(4)] for i in range(n)]
    return tf.data.Dataset.from_tensor_slices({"inputs": [" ".join(w) for w in words],
                                               "targets": [" ".join(reversed(w)) for w in words]})


VOCAB = vocabularies.get_vocabulary("byte")
seqio.TaskRegistry.remove("my_reverse_words")
seqio.TaskRegistry.add(
    "my_reverse_words",
    source=seqio.FunctionDataSource(_source, splits=("train", "validation")),
    preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
    output_features={"inputs": seqio.Feature(VOCAB, add_eos=True), "targets": seqio.Feature(VOCAB, add_eos=True)},
    metric_fns=[metrics.exact_match, metrics.bleu, metrics.chrf])
'''

# What a user writes: a gin file importing their module (on PYTHONPATH or in the working
# directory), naming the task, its lengths and the model. Give the run file first.
USER_GIN = '''import my_eval_tasks
include 'models/llama_tiny.gin'

MIXTURE_OR_TASK_NAME = 'my_reverse_words'
TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 32}
BATCH_SIZE = 8
DecoderOnlyConfig.num_layers = 1
DecoderOnlyConfig.vocab_size = 384
DecoderOnlyConfig.d_model = 32
DecoderOnlyConfig.head_dim = 16
DecoderOnlyConfig.mlp_dim = 64
'''


def test_cli_task_without_metrics_is_one_error_line(tasks, tmp_path, capsys):
    from t5x_like import main

    (tmp_path / "run.gin").write_text(f"MIXTURE_OR_TASK_NAME = '{NO_METRICS}'\n"
                                      "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 32}\n")
    args = ["infer_eval", "--gin_file=runs/infer_eval.gin", "--gin_file=models/t5_1_1_tiny.gin",
            f"--gin_file={tmp_path / 'run.gin'}", f"--gin.CHECKPOINT_DIR='{tmp_path}'", f"--output_dir={tmp_path}"]
    assert main.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no metric_fns" in err, err
    assert main.main(args[:-1]) == 2  # no OUTPUT_DIR
    assert "missing required gin macro(s) OUTPUT_DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_train_with_infer_eval_then_infer_eval_mode(tmp_path):
    """A user's task from their own module: `train` with train.infer_eval_every, then the
    `infer_eval` mode on the checkpoint gives the predictions training logged at that step."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    (tmp_path / "my_eval_tasks.py").write_text(USER_MODULE)
    (tmp_path / "my_task.gin").write_text(USER_GIN)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(tmp_path))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "t5x_like.main", *args], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run, out, task = tmp_path / "run", tmp_path / "out", "my_reverse_words"
    cli("train", "--gin_file=runs/pretrain.gin", f"--gin_file={tmp_path / 'my_task.gin'}", f"--gin.MODEL_DIR='{run}'",
        "--gin.TRAIN_STEPS=4", "--gin.train.infer_eval_every=2", "--gin.InferEvaluator.max_examples=6",
        "--gin.InferEvaluator.max_new_tokens=8", "--gin.InferEvaluator.batch_size=4", "--gin.train.eval_every=0",
        "--gin.train.measure_peak=False", "--gin.train.progress=False", "--gin.train.checkpoint_every=4")
    logged = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == f"infer_eval/{task}"]
    assert [r["step"] for r in logged] == [2, 4]
    assert all(np.isfinite(r[k]) for r in logged for k in ("exact_match", "bleu", "chrf"))
    trained = read_jsonl(run / "inference_eval" / f"{task}-4.jsonl")
    assert len(trained) == 6 and len(read_jsonl(run / "inference_eval" / f"{task}-2.jsonl")) == 6

    proc = cli("infer_eval", "--gin_file=runs/infer_eval.gin", f"--gin_file={tmp_path / 'my_task.gin'}",
               f"--gin.CHECKPOINT_DIR='{run}'", f"--output_dir={out}", "--gin.MAX_EXAMPLES=6",
               "--gin.InferEvaluator.max_new_tokens=8")
    assert f"infer_eval {task}: exact_match=" in proc.stdout
    rows = read_jsonl(out / "inference_eval" / f"{task}-4.jsonl")
    assert [(r["index"], r["input"], r["target"]) for r in rows] == [(r["index"], r["input"], r["target"])
                                                                     for r in trained]
    assert [r["split"] for r in read_jsonl(out / "metrics.jsonl")] == [f"infer_eval/{task}"]
