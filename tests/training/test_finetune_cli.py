"""Fine-tuning as a user runs it: a seqio task registered in the user's own module
(user_task_module.py, imported by user_task.gin), pretrain -> QLoRA fine-tune -> eval -> infer_eval
-> peft export, each through the command line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from t5x_like.layers.quantization import quantize
from t5x_like.training import checkpointing

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FAST = ["--gin.train.log_every=1", "--gin.train.eval_every=4", "--gin.train.checkpoint_every=4",
        "--gin.train.eval_batches=None", "--gin.train.measure_peak=False", "--gin.train.progress=False"]
QLORA = ["--gin.DecoderOnlyModel.lora=@LoraConfig()", "--gin.LoraConfig.targets='all-linear'",
         "--gin.DecoderOnlyModel.weight_quantization='nf4'"]
TASK = ["--gin_file=tests/training/user_task.gin"]


def cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=HERE)
    proc = subprocess.run([sys.executable, "-m", "t5x_like.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_user_task_pretrain_qlora_eval_infer_eval_export(tmp_path):
    base, tuned = str(tmp_path / "base"), str(tmp_path / "qlora")
    cli("train", "--gin_file=runs/pretrain.gin", *TASK, f"--gin.MODEL_DIR='{base}'", "--gin.TRAIN_STEPS=4", *FAST)
    cli("train", "--gin_file=runs/finetune.gin", *TASK, f"--gin.MODEL_DIR='{tuned}'", "--gin.TRAIN_STEPS=4",
        f"--gin.INITIAL_CHECKPOINT='{base}'", *QLORA, *FAST)

    # The base is the pretrained run's, stored in NF4 and frozen; only the adapters trained.
    before, after = checkpointing.restore_params(base), checkpointing.restore_params(tuned)
    wo_before, wo_after = before["decoder"]["layers_0"]["mlp"]["wo"], after["decoder"]["layers_0"]["mlp"]["wo"]
    np.testing.assert_array_equal(wo_after["kernel"]["codes"], quantize(wo_before["kernel"], "nf4").codes)
    assert np.abs(wo_after["lora_b"]).max() > 0  # B starts at zero
    np.testing.assert_array_equal(after["token_embed"]["embedding"], before["token_embed"]["embedding"])

    out = cli("eval", "--gin_file=runs/eval.gin", *TASK, f"--gin.CHECKPOINT_DIR='{tuned}'", *QLORA)
    assert "validation user_reverse_words" in out
    out = cli("infer_eval", "--gin_file=runs/infer_eval.gin", *TASK, f"--gin.CHECKPOINT_DIR='{tuned}'",
              f"--output_dir={tmp_path / 'generated'}", *QLORA)
    assert "user_reverse_words" in out
    [predictions] = os.listdir(tmp_path / "generated" / "inference_eval")
    rows = [json.loads(line) for line in open(tmp_path / "generated" / "inference_eval" / predictions)]
    assert len(rows) == 8 and rows[0]["target"] == "theta kappa sigma"

    cli("export_peft", f"--run_dir={tuned}", f"--output_dir={tmp_path / 'peft'}")
    config = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    assert config["r"] == 8 and config["task_type"] == "CAUSAL_LM"
