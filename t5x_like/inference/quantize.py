"""Weight-only quantized checkpoints for serving (the `quantize` mode).

`quantize_checkpoint(run_dir, output_dir, scheme)` restores a run's (or an import's) latest params
in float, stores them as int8 / int4 / nf4 `QuantizedArray`s with the model's own `quantize_params`
(layers/quantization.py: `kernel$` leaves of at least 4096 values, the untied `logits_dense`
included, and the embedding tables, one scale per vocabulary row for int8; norms and biases stay
float) and saves them as an import-style folder: `OUT/checkpoints/<step>/params` plus
`OUT/model.gin`, which binds `weight_quantization` and `quantize_embeddings = True`. With
`embeddings=False` (`--keep_float_embeddings`) the embedding tables and `logits_dense` stay float,
as QLoRA keeps them. `eval`, `infer`, `score` and `infer_eval` with `--gin_file=OUT/model.gin`
restore the integer codes directly (their restore target is the quantized `param_shapes()`):
nothing is re-quantized at load. `matmul="int8"` (`--quantized_matmul=int8`; int8 / int4 only)
binds `quantized_matmul = 'int8'` too: layers then multiply int8-quantized activations by the codes
(layers/quantized_matmul.py) instead of dequantizing the kernels; the checkpoint is the same.
"""

from __future__ import annotations

import os
import shutil

import jax

from t5x_like.errors import UserError
from t5x_like.layers import quantization

# Tokenizer files an import folder may hold (import_hf copies them); carried over to the output.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja")


class QuantizeError(UserError):
    pass


def model_config_file(run_dir: str) -> str:
    """The gin file that rebuilds a run's model: a training run's config.gin or an import's model.gin."""
    for name in ("config.gin", "model.gin"):
        if os.path.isfile(os.path.join(run_dir, name)):
            return os.path.join(run_dir, name)
    raise QuantizeError(f"--run_dir={run_dir} has no config.gin or model.gin; pass the MODEL_DIR of a training "
                        "run (or an import_hf / quantize output folder)")


def param_bytes(params, qparams) -> dict:
    """Bytes of float `params` and of their quantized form `qparams`: {'total': (float, quantized),
    'quantized': (float, quantized)}: every leaf, and only the leaves `quantize_params` replaced
    (the rest, e.g. norms and small kernels, is the same in both)."""
    is_q = lambda x: isinstance(x, quantization.QuantizedArray)  # noqa: E731
    pairs = zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(qparams, is_leaf=is_q))
    replaced = [(f, q) for f, q in pairs if is_q(q)]
    return {"total": (quantization.nbytes(params), quantization.nbytes(qparams)),
            "quantized": (quantization.nbytes([f for f, _ in replaced]),
                          quantization.nbytes([q for _, q in replaced]))}


def quantize_checkpoint(run_dir: str, output_dir: str, scheme: str, embeddings: bool = True,
                        matmul: str = "dequantize") -> dict:
    """Write `run_dir`'s latest params quantized with `scheme` to `output_dir` (module docstring);
    `embeddings`: quantize the embedding tables and `logits_dense` too; `matmul`: the model.gin's
    `quantized_matmul` ("dequantize" or "int8").
    Returns {'step', 'checkpoint', 'gin_file', 'bytes'} ('bytes': `param_bytes`)."""
    from t5x_like import gin_config
    from t5x_like.training import checkpointing
    from t5x_like.training.train_state import abstract_params

    if scheme not in quantization.SCHEMES:
        raise QuantizeError(f"--scheme={scheme} is not one of {', '.join(quantization.SCHEMES)}")
    try:
        quantization.check_matmul(scheme, matmul)
    except ValueError as e:
        raise QuantizeError(f"--quantized_matmul={matmul}: {e}") from None
    ckpt_dir = checkpointing.checkpoints_dir(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise QuantizeError(f"--output_dir={output_dir} is a file; choose an empty or new folder")
    if os.path.exists(ckpt_dir) and (not os.path.isdir(ckpt_dir) or os.listdir(ckpt_dir)):
        raise QuantizeError(f"{ckpt_dir} already holds checkpoints; choose an empty --output_dir")
    config = model_config_file(run_dir)
    gin_config.parse([config], [])
    model = gin_config.model_from_gin()
    params, step = checkpointing.restore_params_and_step(run_dir, target=abstract_params(model))
    if model.weight_quantization is not None:  # already quantized (QLoRA, or a quantize output): float first
        params = quantization.dequantize_params(params)
    qmodel = type(model)(model.config, lora=model.lora, weight_quantization=scheme, quantize_embeddings=embeddings,
                         quantized_matmul=matmul)
    qparams = qmodel.quantize_params(params)
    step_dir = checkpointing.save_params(ckpt_dir, step, qparams)
    gin_file = os.path.join(output_dir, "model.gin")
    kind = "weight-only quantization" if matmul == "dequantize" else "weight quantization with int8 activations"
    with open(gin_file, "w") as f:
        f.write(gin_config.model_gin_text(qmodel, f"{scheme} {kind} of {os.path.abspath(run_dir)} "
                                                  f"step {step} (python -m t5x_like.main quantize)"))
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(run_dir, name)):
            shutil.copy(os.path.join(run_dir, name), os.path.join(output_dir, name))
    return {"step": step, "checkpoint": step_dir, "gin_file": gin_file,
            "bytes": param_bytes(params, qparams)}
