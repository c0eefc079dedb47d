"""Preference tasks: JSONL (prompt, chosen, rejected) records -> adjacent (chosen, rejected) rows with the
loss weights exactly on the completions, for a decoder-only and an encoder-decoder model; bad records
and odd batch sizes are one-line errors; and DPO through the command line (slow)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import seqio

from t5x_like import errors
from t5x_like.data import iterators, preferences, vocabularies
from t5x_like.data.chat_templates import InstructionError
from t5x_like.data.corpus import CorpusError
from t5x_like.data.preferences import register_preference_task
from t5x_like.training import checkpointing
from t5x_like.models import DecoderOnlyConfig, DecoderOnlyModel, EncoderDecoderConfig, EncoderDecoderModel

COMMON = dict(vocab_size=384, d_model=16, num_heads=2, head_dim=8, mlp_dim=32)
RECORDS = [{"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green!!"},
           {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
            "chosen": "4", "rejected": [{"role": "assistant", "content": "5 or so"}]}]
PROMPT0, PROMPT1 = "<|user|>\nSky?\n<|assistant|>\n", "<|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n"
LENGTHS = {"inputs": 64, "targets": 12}


def _jsonl(write_file, name, records):
    return write_file(name, ("\n".join(json.dumps(r) for r in records) + "\n").encode())


def _ids(text, eos=True):
    return list(vocabularies.get_vocabulary("byte").encode(text)) + ([1] if eos else [])


def _batch(name, model, batch_size=4, lengths=LENGTHS):
    ds = iterators.get_dataset(name, lengths, batch_size=batch_size, shuffle=False, pack=False, num_epochs=1,
                               model=model)
    return next(ds.as_numpy_iterator())


def test_decoder_only_rows_are_prompt_plus_chosen_then_rejected(write_file):
    name = register_preference_task("prefs_dec", {"train": [_jsonl(write_file, "p.jsonl", RECORDS)]},
                                    vocabulary="byte")
    model = DecoderOnlyModel(DecoderOnlyConfig(num_layers=1, **COMMON))
    batch = _batch(name, model)
    rows = [(PROMPT0, "Blue."), (PROMPT0, "Green!!"), (PROMPT1, "4"), (PROMPT1, "5 or so")]
    width = LENGTHS["inputs"] + LENGTHS["targets"]
    for r, (prompt, completion) in enumerate(rows):
        seq = _ids(prompt, eos=False) + _ids(completion)
        expected_targets = np.zeros(width, np.int32)
        expected_targets[:len(seq)] = seq
        np.testing.assert_array_equal(batch["decoder_target_tokens"][r], expected_targets)
        weights = np.zeros(width, np.int32)
        weights[len(_ids(prompt, eos=False)):len(seq)] = 1
        np.testing.assert_array_equal(batch["decoder_loss_weights"][r], weights)
    assert "decoder_causal_attention" not in batch


def test_encoder_decoder_rows_and_truncation_counts(write_file):
    name = register_preference_task("prefs_encdec", [_jsonl(write_file, "p.jsonl", RECORDS)], vocabulary="byte",
                                    inputs_eos=True)
    model = EncoderDecoderModel(EncoderDecoderConfig(num_encoder_layers=1, num_decoder_layers=1, **COMMON))
    lengths = {"inputs": 20, "targets": 6}  # cuts both prompts (at the front) and "Green!!", "5 or so"
    batch = _batch(name, model, lengths=lengths)
    enc = batch["encoder_input_tokens"]
    np.testing.assert_array_equal(enc[0], enc[1])
    np.testing.assert_array_equal(enc[0], _ids(PROMPT0, eos=False)[-19:] + [1])  # the prompt's end
    for r, completion in enumerate(["Blue.", "Green", "4", "5 or "]):
        expected = _ids(completion)
        np.testing.assert_array_equal(batch["decoder_target_tokens"][r][:len(expected)], expected)
        assert batch["decoder_loss_weights"][r].tolist() == [1] * len(expected) + [0] * (6 - len(expected))
    assert preferences.truncation_counts(name, lengths) == {"examples": 2, "identical_dropped": 0, "prompts_cut": 2,
                                                            "chosen_cut": 0, "rejected_cut": 2}


def test_pairs_with_chosen_equal_to_rejected_are_dropped_counted_and_warned(write_file, caplog):
    same = {"prompt": "Sky?", "chosen": "Blue.", "rejected": "Blue."}
    path = _jsonl(write_file, "same.jsonl", [RECORDS[0], same, RECORDS[1], same])
    with caplog.at_level("WARNING", logger="t5x_like.data.preferences"):
        name = register_preference_task("prefs_same", [path], vocabulary="byte")
    assert "2 of 4 pairs have chosen == rejected" in caplog.text
    counts = preferences.truncation_counts(name, {"inputs": 64, "targets": 16})
    assert counts["examples"] == 2 and counts["identical_dropped"] == 2
    ds = seqio.get_mixture_or_task(name).get_dataset({"inputs": 64, "targets": 16}, split="train", shuffle=False)
    assert [bytes(ex["targets_pretokenized"]).decode() for ex in ds.as_numpy_iterator()] == [
        RECORDS[0]["chosen"], RECORDS[1]["chosen"]]


@pytest.mark.parametrize("record, says", [
    ({"prompt": "Hi", "chosen": "Yo"}, "has no 'rejected' field"),
    ({"chosen": "a", "rejected": "b"}, "has no 'prompt' field"),
    ({"prompt": "Hi", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string"),
    ({"messages": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "message 1 has role"),
])
def test_bad_records_are_one_line_errors_naming_path_and_line(write_file, record, says):
    path = _jsonl(write_file, "bad.jsonl", [RECORDS[0], record])
    with pytest.raises(InstructionError) as e:
        register_preference_task("prefs_bad", [path], vocabulary="byte")
    message = errors.user_message(e.value)  # gin appends its call to a configurable's error
    assert message.startswith(f"{path}:2: ") and says in message and "\n" not in message


def test_odd_batch_size_and_other_rejected_length_are_refused(write_file):
    name = register_preference_task("prefs_odd", [_jsonl(write_file, "p.jsonl", RECORDS)], vocabulary="byte")
    model = DecoderOnlyModel(DecoderOnlyConfig(num_layers=1, **COMMON))
    with pytest.raises(CorpusError, match="per-host batch size must be a multiple of 2; got 3"):
        _batch(name, model, batch_size=3)
    with pytest.raises(CorpusError, match="rejected completion uses the targets length"):
        _batch(name, model, lengths={**LENGTHS, "rejected": 5})
    with pytest.raises(CorpusError, match="would split a .chosen, rejected. pair"):
        iterators.get_iterator(name, LENGTHS, batch_size=4, host_rows=(1, 3), model=model)


HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FAST = ["--gin.train.log_every=1", "--gin.train.checkpoint_every=100", "--gin.train.measure_peak=False",
        "--gin.train.progress=False"]
TINY = ["--gin_file=models/llama_tiny.gin", "--gin.DecoderOnlyConfig.num_layers=1", "--gin.BATCH_SIZE=8",
        "--gin.DecoderOnlyConfig.vocab_size=384", "--gin.DecoderOnlyConfig.d_model=32",
        "--gin.DecoderOnlyConfig.head_dim=8", "--gin.DecoderOnlyConfig.mlp_dim=64",
        "--gin.DecoderOnlyConfig.num_heads=4"]


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "t5x_like.main", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_dpo_run_file_trains_lora_dpo_from_a_checkpoint(tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1] + "?"}) + "\n"
                             for w in ["alpha", "beta", "gamma", "delta", "kappa", "sigma"]))
    base, dpo = tmp_path / "base", tmp_path / "dpo"
    _cli("train", *TINY, "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR='{base}'", "--gin.TRAIN_STEPS=2",
         "--gin.MIXTURE_OR_TASK_NAME='embedded_lm_byte'", "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
         "--gin.train.eval_every=0", *FAST)
    _cli("train", *TINY, "--gin_file=runs/dpo.gin", f"--gin.MODEL_DIR='{dpo}'", "--gin.TRAIN_STEPS=3",
         f"--gin.INITIAL_CHECKPOINT='{base}'", f"--gin.PREFERENCE_FILES=['{prefs}']", "--gin.VOCABULARY='byte'",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 8}", *FAST)
    train = [r for r in map(json.loads, open(dpo / "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for row in train:
        assert 0.0 <= row["rewards/accuracies"] <= 1.0 and np.isfinite(row["rewards/margins"]), row
    assert train[0]["rewards/margins"] == 0.0  # step 1: adapters at zero, the policy is the reference
    after = checkpointing.restore_params(str(dpo))
    assert np.abs(after["decoder"]["layers_0"]["self_attention"]["query"]["lora_b"]).max() > 0


@pytest.mark.slow
def test_dpo_full_run_file_uses_a_frozen_reference_and_reports_held_out_metrics(tmp_path):
    prefs, dev = tmp_path / "prefs.jsonl", tmp_path / "dev.jsonl"
    for path, words in ((prefs, ["alpha", "beta", "gamma", "delta"]), (dev, ["kappa", "sigma"])):
        path.write_text("".join(json.dumps({"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1] + "?"}) + "\n"
                                for w in words))
    base, dpo = tmp_path / "base", tmp_path / "dpo"
    _cli("train", *TINY, "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR='{base}'", "--gin.TRAIN_STEPS=2",
         "--gin.MIXTURE_OR_TASK_NAME='embedded_lm_byte'", "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
         "--gin.train.eval_every=0", *FAST)
    _cli("train", *TINY, "--gin_file=runs/dpo_full.gin", f"--gin.MODEL_DIR='{dpo}'", "--gin.TRAIN_STEPS=2",
         f"--gin.INITIAL_CHECKPOINT='{base}'", "--gin.VOCABULARY='byte'", "--gin.train.eval_every=2",
         f"--gin.PREFERENCE_FILES={{'train': ['{prefs}'], 'validation': ['{dev}']}}",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 8}", *FAST)
    rows = [json.loads(line) for line in open(dpo / "metrics.jsonl")]
    train = [r for r in rows if r["split"] == "train"]
    assert abs(train[0]["rewards/margins"]) < 1e-5 and train[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    (held_out,) = [r for r in rows if r["split"] == "eval"]
    assert held_out["step"] == 2 and 0.0 <= held_out["rewards/accuracies"] <= 1.0
    assert "lora_b" not in json.dumps(jax_paths(checkpointing.restore_params(str(dpo))))


def jax_paths(tree, prefix=""):
    """'/'-joined leaf paths of a nested dict."""
    if not hasattr(tree, "items"):
        return [prefix]
    return [p for k, v in tree.items() for p in jax_paths(v, f"{prefix}/{k}")]


@pytest.mark.slow
def test_reward_model_run_file_trains_a_head_on_an_sft_backbone(tmp_path):
    prefs, dev = tmp_path / "prefs.jsonl", tmp_path / "dev.jsonl"
    for path, words in ((prefs, ["alpha", "beta", "gamma", "delta"]), (dev, ["kappa", "sigma"])):
        path.write_text("".join(json.dumps({"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1] + "?"}) + "\n"
                                for w in words))
    base, rm = tmp_path / "base", tmp_path / "rm"
    _cli("train", *TINY, "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR='{base}'", "--gin.TRAIN_STEPS=2",
         "--gin.MIXTURE_OR_TASK_NAME='embedded_lm_byte'", "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
         "--gin.train.eval_every=0", *FAST)
    _cli("train", *TINY, "--gin_file=runs/reward_model.gin", f"--gin.MODEL_DIR='{rm}'", "--gin.TRAIN_STEPS=3",
         f"--gin.INITIAL_CHECKPOINT='{base}'", "--gin.VOCABULARY='byte'", "--gin.train.eval_every=3",
         f"--gin.PREFERENCE_FILES={{'train': ['{prefs}'], 'validation': ['{dev}']}}",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 8}", *FAST)
    rows = [json.loads(line) for line in open(rm / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    (held_out,) = [r for r in rows if r["split"] == "eval"]
    assert held_out["tokens"] == 2 and 0.0 <= held_out["accuracy"] <= 1.0 and np.isfinite(held_out["margin"])
    params = checkpointing.restore_params(str(rm))
    assert params["reward_head"]["kernel"].shape == (32, 1) and "logits_dense" not in params
    sft = checkpointing.restore_params(str(base))
    np.testing.assert_array_equal(params["token_embed"]["embedding"].shape, sft["token_embed"]["embedding"].shape)
