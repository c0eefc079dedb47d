"""The `quantize` mode (inference/quantize.py): int8 / int4 / nf4 weight-only checkpoints saved as
integer codes (dense kernels, the embedding table and the output projection), restored as such by
eval / infer (no re-quantization at load)."""

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
is_q = lambda x: isinstance(x, quantization.QuantizedArray)  # noqa: E731


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny LLaMA-style float checkpoint (import layout: checkpoints/<step>/params + model.gin;
    random weights, no training, to keep the suite fast; untied, vocabulary 384 x d_model 64),
    quantized by the CLI to int8 and int4 (everything) and to int8 with float embeddings
    (`--keep_float_embeddings`, folder int8_kernels)."""
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
    assert main.main(["quantize", f"--run_dir={run_dir}", f"--output_dir={root / 'int8_kernels'}",
                      "--scheme=int8", "--keep_float_embeddings"]) == 0
    return root, model, params


def _quantized(model, scheme, embeddings=True):
    return type(model)(model.config, lora=model.lora, weight_quantization=scheme, quantize_embeddings=embeddings)


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


@pytest.mark.parametrize("scheme, code_dtype", [("int8", np.int8), ("int4", np.uint8)])
def test_checkpoint_holds_integer_codes_on_disk(run, scheme, code_dtype):
    root, model, _ = run
    raw = checkpointing.restore_params(str(root / scheme))  # no target: as saved
    flat = {"/".join(k): v for k, v in _flatten(raw)}
    assert any(k.endswith("mlp/wi_0/kernel/codes") for k in flat), sorted(flat)
    for k, v in flat.items():
        if k.endswith("/codes"):
            assert v.dtype == code_dtype, (k, v.dtype)
        elif k.endswith("/scale"):  # a QuantizedArray's scales, or a norm's
            assert v.dtype == np.float32
        else:  # what is left float is small (key / value kernels of 2048 values)
            assert np.size(v) < 4096, (k, v.shape)
    vocab, d = model.config.vocab_size, model.config.d_model
    emb_codes, emb_scale = flat["token_embed/embedding/codes"], flat["token_embed/embedding/scale"]
    out_codes, out_scale = flat["logits_dense/kernel/codes"], flat["logits_dense/kernel/scale"]
    if scheme == "int8":  # one scale per vocabulary entry in both tables
        assert emb_codes.shape == (vocab, d) and emb_scale.shape == (vocab, 1)
        assert out_codes.shape == (d, vocab) and out_scale.shape == (1, vocab)
    else:  # int4: two codes per byte along embed, one scale per (row, block of 128 or the whole 64)
        assert emb_codes.shape == (vocab, d // 2) and emb_scale.shape == (vocab, 1)
        assert out_codes.shape == (d // 2, vocab) and out_scale.shape == (1, vocab)
    assert os.listdir(root / scheme / "checkpoints") == ["7"]  # the source's step
    text = open(root / scheme / "model.gin").read()
    assert f"DecoderOnlyModel.weight_quantization = '{scheme}'" in text
    assert "DecoderOnlyModel.quantize_embeddings = True" in text


def test_keep_float_embeddings_quantizes_only_the_kernels(run):
    root, _, params = run
    flat = {"/".join(k): v for k, v in _flatten(checkpointing.restore_params(str(root / "int8_kernels")))}
    np.testing.assert_array_equal(flat["token_embed/embedding"], params["token_embed"]["embedding"])
    np.testing.assert_array_equal(flat["logits_dense/kernel"], params["logits_dense"]["kernel"])
    assert flat["decoder/layers_0/mlp/wi_0/kernel/codes"].dtype == np.int8
    assert "quantize_embeddings" not in open(root / "int8_kernels" / "model.gin").read()


@pytest.mark.parametrize("scheme, embeddings, tol", [pytest.param("int8", True, 0.02, marks=pytest.mark.slow),
                                                     ("int4", True, 0.35), ("int8", False, 0.01)])
def test_eval_restore_equals_in_memory_quantization(run, scheme, embeddings, tol):
    """The restore eval / infer do (the quantized param_shapes() of the model the output's
    model.gin builds as target) gives the in-memory quantized params exactly, hence the same logits;
    int8 logits are close to float's (tol: relative L2 error of the logits, random weights)."""
    root, model, params = run
    folder = root / (scheme if embeddings else f"{scheme}_kernels")
    gin_config.parse([str(folder / "model.gin")], [])
    qmodel = gin_config.model_from_gin()
    assert (qmodel.weight_quantization, qmodel.quantize_embeddings) == (scheme, embeddings)
    restored = checkpointing.restore_params(str(folder), target=abstract_params(qmodel))
    in_memory = _quantized(model, scheme, embeddings).quantize_params(params)
    assert is_q(restored["token_embed"]["embedding"]) == embeddings == is_q(restored["logits_dense"]["kernel"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, in_memory)
    batch = model.random_batch(2, 16)
    logits = model.compute_logits({"params": params}, batch)
    q_logits = qmodel.compute_logits({"params": restored}, batch)
    np.testing.assert_array_equal(q_logits, qmodel.compute_logits({"params": in_memory}, batch))
    rel = float(np.linalg.norm(q_logits - logits) / np.linalg.norm(logits))
    assert 0 < rel < tol, (scheme, rel)


def test_eval_equals_eval_of_the_round_tripped_float_params(run):
    """`evaluate` on the int8 output (integer embedding and output projection, the fused loss's
    head dequantized) gives the loss of the float model evaluated on the dequantized params."""
    from t5x_like.training import trainer

    root, model, params = run
    qmodel = _quantized(model, "int8")
    rt_dir = root / "int8_round_trip"
    dequantized = quantization.dequantize_params(qmodel.quantize_params(params))
    checkpointing.save_params(checkpointing.checkpoints_dir(str(rt_dir)), 7, dequantized)
    assert not np.array_equal(dequantized["token_embed"]["embedding"], params["token_embed"]["embedding"])
    kw = dict(mixture_or_task_name="embedded_lm_byte", task_feature_lengths={"targets": 64}, batch_size=8,
              eval_batches=2)
    quantized = trainer.evaluate(model=qmodel, checkpoint_dir=str(root / "int8"), **kw)
    float_rt = trainer.evaluate(model=model, checkpoint_dir=str(rt_dir), **kw)
    for task in quantized:
        assert quantized[task]["tokens"] == float_rt[task]["tokens"] > 0
        np.testing.assert_allclose(quantized[task]["nll"], float_rt[task]["nll"], rtol=1e-5, atol=1e-5)


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


def test_quantize_cli_int8_activations(run, capsys, tmp_path):
    """`--quantized_matmul=int8`: the int8 output's codes, a model.gin that binds quantized_matmul,
    a restore whose QuantizedArrays carry it, and an eval (int8 activations) close to f32's."""
    root, _, _ = run
    out = tmp_path / "int8_a8"
    assert main.main(["quantize", f"--run_dir={root / 'run'}", f"--output_dir={out}", "--scheme=int8",
                      "--quantized_matmul=int8"]) == 0
    assert "DecoderOnlyModel.quantized_matmul = 'int8'" in (out / "model.gin").read_text()
    gin_config.parse([str(out / "model.gin")], [])
    qmodel = gin_config.model_from_gin()
    restored = checkpointing.restore_params(str(out), target=abstract_params(qmodel))
    leaves = [x for x in jax.tree_util.tree_leaves(restored, is_leaf=is_q) if is_q(x)]
    assert leaves and {x.matmul for x in leaves} == {"int8"}
    jax.tree_util.tree_map(np.testing.assert_array_equal, checkpointing.restore_params(str(out)),
                           checkpointing.restore_params(str(root / "int8")))
    f32 = _eval_ppl(capsys, root / "run" / "model.gin", checkpoint=root / "run")
    weight_only = _eval_ppl(capsys, root / "int8" / "model.gin", checkpoint=root / "int8")
    a8 = _eval_ppl(capsys, out / "model.gin", checkpoint=out)
    assert a8 != weight_only and abs(a8 / f32 - 1) < 0.01, (f32, weight_only, a8)


@pytest.mark.parametrize("args, expected", [
    (["--output_dir=OUT", "--scheme=int8"], "quantize needs one --run_dir"),
    (["--run_dir=RUN", "--output_dir=OUT"], "quantize needs one --run_dir"),
    (["--run_dir=RUN", "--output_dir=OUT", "--scheme=int3"], "--scheme=int3 is not one of"),
    (["--run_dir=RUN", "--output_dir=int8", "--scheme=int8"], "already holds checkpoints"),
    (["--run_dir=nowhere", "--output_dir=OUT", "--scheme=int8"], "has no config.gin or model.gin"),
    (["--run_dir=RUN", "--output_dir=OUT", "--scheme=nf4", "--quantized_matmul=int8"], "nf4 is dequantize-only"),
])
def test_user_errors_are_one_line(run, args, expected, capsys, tmp_path):
    root = run[0]
    args = [a.replace("RUN", str(root / "run")).replace("OUT", str(tmp_path / "out"))
            .replace("=int8", f"={root / 'int8'}" if a.startswith("--output_dir") else "=int8") for a in args]
    assert main.main(["quantize", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not os.path.exists(tmp_path / "out" / "checkpoints")
