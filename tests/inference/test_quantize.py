"""The `quantize` mode (inference/quantize.py): int8 / int4 / nf4 weight-only checkpoints saved as
integer codes, restored as such by eval / infer (no re-quantization at load)."""

import json
import os

import jax
import numpy as np
import pytest

from t5x_like import gin_config, main
from t5x_like.layers import quantization
from t5x_like.training import checkpointing
from t5x_like.training.train_state import abstract_params

TASK = ["--gin.MIXTURE_OR_TASK_NAME='embedded_lm_byte'", "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
        "--gin.BATCH_SIZE=8", "--gin.EVAL_BATCHES=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny LLaMA-style float checkpoint (import layout: checkpoints/<step>/params + model.gin;
    random weights, no training, to keep the suite fast), quantized to int8 and int4 by the CLI."""
    root = tmp_path_factory.mktemp("quantize")
    run_dir = root / "run"
    gin_config.parse(["tests/tiny_lm_run.gin"], [])
    model = gin_config.model_from_gin()
    params = model.init_variables(jax.random.key(0))["params"]
    checkpointing.save_params(checkpointing.checkpoints_dir(str(run_dir)), 7, params)
    (run_dir / "model.gin").write_text(gin_config.model_gin_text(model))
    for scheme in ("int8", "int4"):
        assert main.main(["quantize", f"--run_dir={run_dir}", f"--output_dir={root / scheme}",
                          f"--scheme={scheme}"]) == 0
    return root, model, params


def _quantized(model, scheme):
    return type(model)(model.config, lora=model.lora, weight_quantization=scheme)


def test_checkpoint_holds_integer_codes_on_disk(run):
    root, model, _ = run
    for scheme, code_dtype in (("int8", np.int8), ("int4", np.uint8)):
        raw = checkpointing.restore_params(str(root / scheme))  # no target: as saved
        flat = {"/".join(k): v for k, v in _flatten(raw)}
        mlp = [k for k in flat if k.endswith("mlp/wi_0/kernel/codes")]
        assert mlp, sorted(flat)
        for k, v in flat.items():
            if k.endswith("/codes"):
                assert v.dtype == code_dtype, (scheme, k, v.dtype)
            elif k.endswith("/scale"):
                assert v.dtype == np.float32
        assert not any(k.endswith("/kernel") and "logits_dense" not in k and np.size(v) >= 4096
                       for k, v in flat.items())  # every large kernel but the output projection is codes
        assert os.listdir(root / scheme / "checkpoints") == ["7"]  # the source's step
        text = open(root / scheme / "model.gin").read()
        assert f"DecoderOnlyModel.weight_quantization = '{scheme}'" in text


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def test_eval_restore_equals_in_memory_quantization(run):
    """The restore eval / infer do (the quantized param_shapes() as target) gives the in-memory
    quantized params exactly, hence the same logits; int8 logits are close to float's."""
    root, model, params = run
    batch = model.random_batch(2, 16)
    logits = model.compute_logits({"params": params}, batch)
    for scheme, tol in (("int8", 0.01), ("int4", 0.2)):  # relative L2 error of the logits (random weights)
        qmodel = _quantized(model, scheme)
        restored = checkpointing.restore_params(str(root / scheme), target=abstract_params(qmodel))
        in_memory = qmodel.quantize_params(params)
        is_q = lambda x: isinstance(x, quantization.QuantizedArray)  # noqa: E731
        assert any(is_q(x) for x in jax.tree_util.tree_leaves(restored, is_leaf=is_q))
        jax.tree_util.tree_map(np.testing.assert_array_equal, restored, in_memory)
        q_logits = qmodel.compute_logits({"params": restored}, batch)
        np.testing.assert_array_equal(q_logits, qmodel.compute_logits({"params": in_memory}, batch))
        rel = float(np.linalg.norm(q_logits - logits) / np.linalg.norm(logits))
        assert 0 < rel < tol, (scheme, rel)


def _eval_ppl(capsys, *gin_files, checkpoint):
    assert main.main(["eval", *(f"--gin_file={f}" for f in gin_files), "--gin_file=runs/eval.gin",
                      f"--gin.CHECKPOINT_DIR='{checkpoint}'", *TASK]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("validation ")][-1]
    return float(line.split("perplexity=")[1].split()[0])


def test_eval_and_infer_cli_read_the_quantized_checkpoint(run, capsys, tmp_path):
    root, model, params = run
    f32 = _eval_ppl(capsys, root / "run" / "model.gin", checkpoint=root / "run")
    int8 = _eval_ppl(capsys, root / "int8" / "model.gin", checkpoint=root / "int8")
    assert abs(int8 / f32 - 1) < 0.01, (f32, int8)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    out = tmp_path / "out.jsonl"
    assert main.main(["infer", f"--gin_file={root / 'int8' / 'model.gin'}", "--gin_file=runs/infer.gin",
                      f"--gin.CHECKPOINT_DIR='{root / 'int8'}'", "--gin.VOCABULARY='byte'",
                      "--gin.infer.max_new_tokens=4", f"--input={prompts}", f"--output={out}"]) == 0
    from t5x_like import inference
    qmodel = _quantized(model, "int8")
    expected = tmp_path / "expected.jsonl"
    inference.infer(str(prompts), str(expected), model=qmodel, checkpoint_dir="unused", vocabulary="byte",
                    max_new_tokens=4, variables={"params": qmodel.quantize_params(params)})
    assert [json.loads(x)["tokens"] for x in open(out)] == [json.loads(x)["tokens"] for x in open(expected)]


@pytest.mark.parametrize("args, expected", [
    (["--output_dir=OUT", "--scheme=int8"], "quantize needs one --run_dir"),
    (["--run_dir=RUN", "--output_dir=OUT"], "quantize needs one --run_dir"),
    (["--run_dir=RUN", "--output_dir=OUT", "--scheme=int3"], "--scheme=int3 is not one of"),
    (["--run_dir=RUN", "--output_dir=int8", "--scheme=int8"], "already holds checkpoints"),
    (["--run_dir=nowhere", "--output_dir=OUT", "--scheme=int8"], "has no config.gin or model.gin"),
])
def test_user_errors_are_one_line(run, args, expected, capsys, tmp_path):
    root = run[0]
    args = [a.replace("RUN", str(root / "run")).replace("OUT", str(tmp_path / "out"))
            .replace("=int8", f"={root / 'int8'}" if a.startswith("--output_dir") else "=int8") for a in args]
    assert main.main(["quantize", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not os.path.exists(tmp_path / "out" / "checkpoints")
