"""DistillationLoss (objectives/distillation.py) against a float64 numpy recomputation of
(1 - alpha) CE + alpha T^2 KL(p_T || q_T) + z-loss; alpha 0 is CrossEntropyLoss; a student equal to
its teacher gets a zero gradient at alpha 1; FrozenTeacher (training/reference.py) restores a teacher
of another config and adds its logits; the trainer runs it end to end (slow); one-line errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like import errors, gin_config, partitioning
from t5x_like.models import DecoderOnlyConfig, DecoderOnlyModel
from t5x_like.objectives.distillation import (TEACHER_FEATURE, DistillationError, DistillationLoss,
                                              teacher_logits)
from t5x_like.objectives.loss import CrossEntropyLoss
from t5x_like.training import checkpointing
from t5x_like.training.reference import FrozenTeacher, ReferenceError

COMMON = dict(vocab_size=96, num_heads=4, head_dim=8, position_embedding="rotary", num_kv_heads=2,
              mlp_activations=("silu", "linear"), tie_embeddings=False)
TEACHER = DecoderOnlyModel(DecoderOnlyConfig(num_layers=2, d_model=32, mlp_dim=64, **COMMON))
STUDENT = DecoderOnlyModel(DecoderOnlyConfig(num_layers=1, d_model=16, mlp_dim=32, **COMMON))


def _batch(seed=0, rows=3, length=10):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, COMMON["vocab_size"], (rows, length + 1)).astype(np.int32)
    weights = (rng.random((rows, length)) < 0.7).astype(np.float32)
    return {"decoder_input_tokens": ids[:, :-1], "decoder_target_tokens": ids[:, 1:], "decoder_loss_weights": weights}


def _params(model, seed):
    return model.init_variables(jax.random.key(seed))["params"]


def _with_teacher(batch, seed=1):
    return {**batch, TEACHER_FEATURE: teacher_logits(TEACHER, _params(TEACHER, seed), batch)}


def _numpy_sums(student_logits, teacher, targets, weights, alpha, temperature, z_loss):
    """The formula in float64: per-token CE, KL(p_T || q_T), z-loss, argmax agreement; weighted sums."""
    s, t = np.asarray(student_logits, np.float64), np.asarray(teacher, np.float64)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    log_z = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    nll = -np.take_along_axis(log_softmax(s), targets[..., None], -1)[..., 0]
    p_t = np.exp(log_softmax(t / temperature))
    kl = np.sum(p_t * (log_softmax(t / temperature) - log_softmax(s / temperature)), -1)
    z = z_loss * log_z ** 2
    per_token = (1 - alpha) * nll + alpha * temperature ** 2 * kl + z
    match = s.argmax(-1) == t.argmax(-1)
    w = weights.astype(np.float64)
    return {"loss": (per_token * w).sum(), "nll_sum": (nll * w).sum(), "kl": (kl * w).sum(),
            "z_loss": (z * w).sum(), "teacher_match": (match * w).sum(), "tokens": w.sum()}


@pytest.mark.parametrize("alpha,temperature", [(0.3, 2.0), pytest.param(1.0, 1.0, marks=pytest.mark.slow),
                                               pytest.param(0.7, 0.5, marks=pytest.mark.slow)])
def test_sums_match_float64_numpy(alpha, temperature):
    batch = _with_teacher(_batch())
    params = _params(STUDENT, 2)
    loss = DistillationLoss(alpha=alpha, temperature=temperature, z_loss=1e-3)
    got = jax.device_get(loss(STUDENT, params, batch))
    logits, _ = STUDENT.forward(params, batch)
    want = _numpy_sums(logits, batch[TEACHER_FEATURE], batch["decoder_target_tokens"],
                       batch["decoder_loss_weights"], alpha, temperature, 1e-3)
    assert want["kl"] > 1.0 and want["teacher_match"] < want["tokens"]  # the two models differ
    for key, value in want.items():
        assert float(got[key]) == pytest.approx(value, rel=1e-5, abs=1e-5), key


def test_alpha_zero_is_the_cross_entropy_loss():
    batch, params = _with_teacher(_batch(3)), _params(STUDENT, 4)
    got = DistillationLoss(alpha=0.0, z_loss=1e-4)(STUDENT, params, batch)
    want = CrossEntropyLoss(z_loss=1e-4, fused=False)(STUDENT, params, batch)
    for key in ("loss", "nll_sum", "z_loss", "tokens", "correct"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6)


def test_student_equal_to_teacher_has_zero_gradient_at_alpha_one():
    params = _params(TEACHER, 1)
    batch = _with_teacher(_batch(5))

    def grads(alpha):
        fn = lambda p: DistillationLoss(alpha=alpha, temperature=2.0)(TEACHER, p, batch)["loss"]  # noqa: E731
        value, g = jax.value_and_grad(fn)(params)
        return float(value), max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(g))

    sums = DistillationLoss(alpha=1.0)(TEACHER, params, batch)
    assert float(sums["teacher_match"]) == float(sums["tokens"]) and abs(float(sums["kl"])) < 1e-5
    value, biggest = grads(1.0)
    assert abs(value) < 1e-5 and biggest < 1e-6, (value, biggest)
    assert grads(0.5)[1] > 1e-3  # the labels still pull: the test can fail


def test_bad_settings_and_batches_are_one_line_errors():
    for kw, needle in [(dict(alpha=1.5), "alpha=1.5"), (dict(temperature=0.0), "temperature=0.0")]:
        with pytest.raises(DistillationError, match=needle):
            DistillationLoss(**kw)
    with pytest.raises(DistillationError, match="FrozenTeacher") as e:
        DistillationLoss()(STUDENT, _params(STUDENT, 0), _batch())
    assert "\n" not in errors.user_message(e.value)
    wide = {**_batch(), TEACHER_FEATURE: jnp.zeros((3, 10, 128))}
    with pytest.raises(DistillationError, match="same vocabulary size"):
        DistillationLoss()(STUDENT, _params(STUDENT, 0), wide)


# ---------------------------------------------------------------- the frozen teacher


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    checkpointing.save_params(str(root), 7, _params(TEACHER, 1))
    return str(root)


def test_frozen_teacher_of_another_config_adds_its_logits(teacher_dir):
    mesh = partitioning.create_mesh(devices=jax.devices()[:1])
    batch = _batch(6)
    shapes = {k: v.shape for k, v in batch.items()}
    teacher = FrozenTeacher(checkpoint=teacher_dir, model=TEACHER).load(STUDENT, mesh, shapes)
    got = teacher.add_features(batch, mesh)
    want = TEACHER.forward(_params(TEACHER, 1), batch)[0]
    np.testing.assert_allclose(np.asarray(got[TEACHER_FEATURE]), np.asarray(want), rtol=1e-5, atol=1e-5)
    (name, (shape, dtype)), = teacher.feature_shapes(shapes).items()
    assert name == TEACHER_FEATURE and shape == want.shape and dtype == got[TEACHER_FEATURE].dtype


def test_teacher_errors_are_one_line(teacher_dir):
    mesh = partitioning.create_mesh(devices=jax.devices()[:1])
    other_vocab = DecoderOnlyModel(DecoderOnlyConfig(num_layers=1, d_model=16, mlp_dim=32, **{**COMMON,
                                                                                              "vocab_size": 64}))
    wrong_model = DecoderOnlyModel(DecoderOnlyConfig(num_layers=3, d_model=32, mlp_dim=64, **COMMON))
    for teacher, student, needle in [(TEACHER, other_vocab, "same family and vocabulary"),
                                     (wrong_model, STUDENT, "teacher checkpoint")]:
        with pytest.raises(ReferenceError, match=needle) as e:
            FrozenTeacher(checkpoint=teacher_dir, model=teacher).load(student, mesh)
        assert "\n" not in errors.user_message(e.value)
    with pytest.raises(ReferenceError, match="logits_dtype"):
        FrozenTeacher(checkpoint=teacher_dir, model=TEACHER, logits_dtype="int8")


def test_draft_distill_gin_binds_a_teacher_of_the_target_config():
    gin_config.parse(["models/llama_tiny.gin", "runs/pretrain.gin", "runs/draft_distill.gin"],
                     ["DRAFT_OVERRIDES = {'num_layers': 2, 'd_model': 64}", "TEACHER_CHECKPOINT = '/x'",
                      "MODEL_DIR = '/y'", "MIXTURE_OR_TASK_NAME = 'embedded_lm_spm'", "TRAIN_STEPS = 1",
                      "TASK_FEATURE_LENGTHS = {'targets': 8}"])
    gin_config.check_required_macros()
    draft = gin_config.model_from_gin()
    import gin

    loss, teacher = gin.get_configurable(DistillationLoss)(), gin.get_configurable(FrozenTeacher)()
    gin_config.parse(["models/llama_tiny.gin"])
    target = gin_config.model_from_gin()
    assert teacher.model.config == target.config and teacher.checkpoint == "/x"
    assert draft.config == target.config.replace(num_layers=2, d_model=64)
    assert (loss.alpha, loss.temperature) == (1.0, 1.0)


@pytest.mark.slow  # a 3-step run with its compiles: ~20 s
def test_trainer_distils_with_a_frozen_teacher(teacher_dir, tmp_path):
    from t5x_like.training import optimizers, trainer

    byte_common = {**COMMON, "vocab_size": 384}
    teacher_model = DecoderOnlyModel(DecoderOnlyConfig(num_layers=2, d_model=32, mlp_dim=64, **byte_common))
    student = DecoderOnlyModel(DecoderOnlyConfig(num_layers=1, d_model=16, mlp_dim=32, **byte_common))
    checkpointing.save_params(str(tmp_path / "teacher"), 0, _params(teacher_model, 1))
    results = trainer.train(
        model=student, model_dir=str(tmp_path / "run"), mixture_or_task_name="embedded_lm_byte",
        task_feature_lengths={"targets": 32}, train_steps=3, batch_size=8,
        optimizer=optimizers.adamw(3e-3, warmup_steps=0, decay_steps=3), loss=DistillationLoss(alpha=1.0),
        reference=FrozenTeacher(checkpoint=str(tmp_path / "teacher"), model=teacher_model), log_every=1,
        eval_every=3, eval_batches=1, checkpoint_every=3, measure_peak=False, progress=False)
    (values,) = results.values()  # evaluation: the loss's eval_sums, with the teacher's features
    assert values["kl"] > 0 and 0.0 <= values["teacher_match"] <= 1.0 and values["perplexity"] > 1.0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train = {r["step"]: r for r in rows if r["split"] == "train"}
    assert train[1]["loss"] == pytest.approx(train[1]["kl"], rel=1e-5)  # alpha 1, T 1, no z-loss
    assert train[3]["kl"] < train[1]["kl"]
