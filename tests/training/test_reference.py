"""Full-parameter DPO with a frozen reference restored from its own checkpoint: the trainer adds the
reference's log-probabilities to every batch, evaluation reports DPO's held-out metrics, the run
gives the same losses on one device and on a data x fsdp mesh of 8, and a reference checkpoint of
another architecture is a one-line error."""

import json

import jax
import numpy as np
import pytest

from t5x_like import errors, partitioning
from t5x_like.data.preferences import register_preference_task
from t5x_like.models import DecoderOnlyConfig, DecoderOnlyModel
from t5x_like.objectives.preference import DPOLoss
from t5x_like.training import checkpointing, optimizers, trainer
from t5x_like.training.reference import FrozenReference, ReferenceError

TINY = dict(vocab_size=384, d_model=32, num_heads=4, head_dim=8, mlp_dim=64, num_layers=2)
WORDS = ["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "theta"]
LENGTHS = {"inputs": 16, "targets": 8}


def _records(words):
    return "".join(json.dumps({"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1]}) + "\n" for w in words)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_full")
    (root / "train.jsonl").write_text(_records(WORDS))
    (root / "dev.jsonl").write_text(_records(["zeta", "iota"]))
    task = register_preference_task("dpo_full_prefs", {"train": [str(root / "train.jsonl")],
                                                       "validation": [str(root / "dev.jsonl")]}, vocabulary="byte")
    model = DecoderOnlyModel(DecoderOnlyConfig(**TINY))
    params = model.init_variables(jax.random.key(3))["params"]
    checkpointing.save_params(str(root / "base"), 0, params)
    return root, task, model


def _run(root, task, model, name, mesh_fn):
    out = root / name
    results = trainer.train(
        model=model, model_dir=str(out), mixture_or_task_name=task, task_feature_lengths=LENGTHS, train_steps=3,
        batch_size=8, optimizer=optimizers.adamw(1e-3, warmup_steps=0, decay_steps=3), loss=DPOLoss(reference="features"),
        reference=FrozenReference(checkpoint=str(root / "base")), init_checkpoint=str(root / "base"),
        mesh_fn=mesh_fn, pack=False, dropout=False, log_every=1, eval_every=3, eval_batches=None,
        checkpoint_every=3, measure_peak=False, progress=False)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return {r["step"]: r for r in rows if r["split"] == "train"}, results


@pytest.mark.slow  # two 3-step runs with compiles: ~30 s
def test_full_dpo_starts_at_the_reference_and_is_the_same_on_8_devices(setup):
    root, task, model = setup
    one, results = _run(root, task, model, "one", lambda: partitioning.create_mesh(devices=jax.devices()[:1]))
    eight, _ = _run(root, task, model, "eight", lambda: partitioning.create_mesh(data=2, fsdp=4))
    # Step 1: the policy is the reference, so every reward is 0 and the loss is log 2.
    assert one[1]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert one[1]["rewards/chosen"] == 0.0 and one[1]["rewards/margins"] == 0.0
    assert one[3]["loss"] < one[1]["loss"] and one[3]["rewards/margins"] > 0
    for step in (1, 2, 3):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert eight[step][key] == pytest.approx(one[step][key], abs=1e-5, rel=1e-5), (step, key)
    (held_out,) = results.values()  # evaluation reports DPO's own metrics on the validation pairs
    assert held_out["tokens"] == 2 and 0.0 <= held_out["rewards/accuracies"] <= 1.0
    assert "perplexity" not in held_out and np.isfinite(held_out["rewards/margins"])


def test_reference_of_another_architecture_is_a_one_line_error(setup):
    root, _, _ = setup
    other = DecoderOnlyModel(DecoderOnlyConfig(**{**TINY, "d_model": 48}))
    mesh = partitioning.create_mesh(devices=jax.devices()[:1])
    with pytest.raises(ReferenceError) as e:
        FrozenReference(checkpoint=str(root / "base")).load(other, mesh)
    message = errors.user_message(e.value)
    assert "reference checkpoint" in message and "DecoderOnlyModel" in message and "\n" not in message


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ReferenceError, match="dtype='float16'; use one of float32, bfloat16"):
        FrozenReference(checkpoint="x", dtype="float16")
