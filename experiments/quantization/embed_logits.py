"""Measure int8 / int4 weight-only quantization of the token embedding and the output projection too.

Why a script: the model's `quantize_params` (models/base.py) keeps `token_embed` and `logits_dense`
float, and `Embed` cannot read a `QuantizedArray`. Their effect is measured here without changing
the layers: each is quantized and dequantized (round trip; the values an integer layer would read)
and saved as a float folder, which the `quantize` mode then quantizes as usual (dense kernels), so
`eval` on the result gives the perplexity of "everything quantized". Bytes are those of the
quantized forms: the embedding with one scale per token row (int8) or per 128-value group of a row
(int4), `logits_dense` per output channel (int8) or per 128-value input group (int4).

python experiments/quantization/embed_logits.py runs/quickstart   # writes runs/quickstart_<s>_all
"""

import os
import sys

import jax
import numpy as np

from t5x_like import gin_config
from t5x_like.inference import quantize as quantize_mode
from t5x_like.layers import quantization
from t5x_like.training import checkpointing
from t5x_like.training.train_state import abstract_params


def quantized_embed_and_logits(params, scheme):
    """(params with the two tables round-tripped, {name: (float bytes, quantized bytes)})."""
    out, sizes = jax.tree_util.tree_map(lambda x: x, params), {}
    emb = params["token_embed"]["embedding"]           # [vocab, embed]: rows are tokens
    q = quantization.quantize(emb.T, scheme, in_axes=(0,))        # [embed, vocab]: a scale per token
    out["token_embed"]["embedding"] = np.asarray(quantization.dequantize(q, np.float32)).T
    sizes["token_embed"] = (quantization.nbytes(emb), quantization.nbytes(q))
    ker = params["logits_dense"]["kernel"]             # [embed, vocab]
    q = quantization.quantize(ker, scheme, in_axes=(0,))
    out["logits_dense"]["kernel"] = np.asarray(quantization.dequantize(q, np.float32))
    sizes["logits_dense"] = (quantization.nbytes(ker), quantization.nbytes(q))
    return out, sizes


def main(run_dir):
    gin_config.parse([quantize_mode.model_config_file(run_dir)], [])
    model = gin_config.model_from_gin()
    params, step = checkpointing.restore_params_and_step(run_dir, target=abstract_params(model))
    total_f32 = quantization.nbytes(params)
    for scheme in ("int8", "int4"):
        rt, sizes = quantized_embed_and_logits(params, scheme)
        rt_dir, out_dir = f"{run_dir}_{scheme}_rt", f"{run_dir}_{scheme}_all"
        checkpointing.save_params(checkpointing.checkpoints_dir(rt_dir), step, rt)
        with open(os.path.join(rt_dir, "model.gin"), "w") as f:
            f.write(gin_config.model_gin_text(model, f"{run_dir} with {scheme} round-tripped embedding/logits"))
        res = quantize_mode.quantize_checkpoint(rt_dir, out_dir, scheme)
        kernels_f, kernels_q = res["bytes"]["quantized_kernels"]
        other = total_f32 - kernels_f - sum(f for f, _ in sizes.values())
        total_q = kernels_q + sum(q for _, q in sizes.values()) + other
        print(f"{scheme}: f32 {total_f32:,} B -> all quantized {total_q:,} B ({total_q / total_f32:.1%}); "
              f"kernels {kernels_f:,} -> {kernels_q:,}; " +
              "; ".join(f"{k} {f:,} -> {q:,}" for k, (f, q) in sizes.items()) + f"; float rest {other:,}; "
              f"eval folder {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1])
