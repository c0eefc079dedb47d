"""The encoder classifier (models/encoder_classifier.py): shapes, learning, regression, its seqio
converter on a user-registered task, fine-tuning from a masked-LM checkpoint, and HF parity."""

import functools
import math

import jax
import numpy as np
import optax
import pytest
import seqio
import tensorflow as tf

from t5x_like.data import iterators, vocabularies
from t5x_like.models import (ConfigError, EncoderClassifierConfig, EncoderClassifierModel, EncoderOnlyConfig,
                             ModelCapabilityError, model_for_config)
from t5x_like.objectives import CrossEntropyLoss, MeanSquaredErrorLoss
from t5x_like.training import optimizers
from t5x_like.training.steps import train_step
from t5x_like.training.train_state import TrainState

BERT = dict(vocab_size=384, d_model=16, num_heads=2, head_dim=8, mlp_dim=32, num_layers=1, mlp_activations=("gelu",),
            position_embedding="learned", max_position_embeddings=16, norm_type="layer", norm_position="post",
            norm_epsilon=1e-12, use_bias=True)


def _model(num_classes: int, pooling: str = "first"):
    return _cached_model(num_classes, pooling)


@functools.lru_cache(maxsize=None)
def _cached_model(num_classes, pooling):
    return model_for_config(EncoderClassifierConfig(**BERT, num_classes=num_classes, pooling=pooling))


@functools.lru_cache(maxsize=None)
def _params(model):
    return model.init_variables(jax.random.key(0))["params"]


def _tokens(rows, length=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, BERT["vocab_size"], (rows, length)).astype(np.int32)
    for row in range(rows):
        ids[row, max(1, length - row):] = 0  # rows with ever more padding
    return ids


@pytest.mark.parametrize("num_classes, pooling", [(3, "first"), (1, "mean")])
def test_logits_and_pooled_hidden_shapes(num_classes, pooling):
    model = _model(num_classes, pooling)
    params, ids = _params(model), _tokens(4)

    def run(params, ids, padded):
        logits, aux = model.forward(params, {"encoder_input_tokens": ids})
        hidden, _ = model.forward(params, {"encoder_input_tokens": ids}, return_hidden=True)
        return logits, aux, hidden, model.forward(params, {"encoder_input_tokens": padded})[0]

    # Extra padding changes nothing: padding is masked in attention and left out of the mean.
    logits, aux, hidden, padded_logits = jax.jit(run)(params, ids, np.pad(ids, ((0, 0), (0, 4))))
    assert logits.shape == (4, 1, num_classes) and logits.dtype == np.float32 and aux == {}
    assert hidden.shape == (4, 1, BERT["d_model"])
    assert set(params["classifier"]) == {"kernel", "bias"} and params["classifier"]["kernel"].shape == (16, num_classes)
    assert not any(k.startswith("mlm") for k in params)
    np.testing.assert_allclose(padded_logits, logits, atol=1e-5)


def test_config_is_checked():
    with pytest.raises(ConfigError, match="num_classes=0"):
        EncoderClassifierConfig(**BERT, num_classes=0)
    with pytest.raises(ConfigError, match="pooling='max'"):
        EncoderClassifierConfig(**BERT, pooling="max")


def test_weights_default_to_rows_with_tokens():
    model = _model(num_classes=3)
    ids = _tokens(3)
    ids[2] = 0  # an all-zero padding row, as evaluation appends to the last batch
    targets, weights = model.targets_and_weights({"encoder_input_tokens": ids,
                                                  "classification_labels": np.array([[0], [2], [0]])})
    np.testing.assert_array_equal(weights, [[1.0], [1.0], [0.0]])  # class 0 is a real class
    assert targets.dtype == np.int32 and targets.shape == (3, 1)


def test_training_steps_drive_accuracy_up():
    """Three classes told apart by which band of ids a row is drawn from."""
    model = _model(num_classes=3)
    rng = np.random.default_rng(0)
    labels = np.arange(24, dtype=np.int32)[:, None] % 3
    ids = (1 + 100 * labels + rng.integers(0, 100, (24, 6))).astype(np.int32)
    batch = {"encoder_input_tokens": ids, "classification_labels": labels,
             "classification_weights": np.ones((24, 1), np.int32)}
    opt = optimizers.Optimizer(optax.sgd(0.5), optax.constant_schedule(0.5))
    state = TrainState.create(model, opt, jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()})
    step = jax.jit(functools.partial(train_step, model, opt, loss=CrossEntropyLoss()))
    evaluate = jax.jit(model.eval_sums)
    before = evaluate(state.params, batch)
    for _ in range(40):
        state, metrics = step(state, batch)
    after = evaluate(state.params, batch)
    assert float(after["tokens"]) == 24
    assert float(after["nll_sum"]) < 0.5 * float(before["nll_sum"])
    assert float(after["correct"]) / 24 >= 0.9 > float(before["correct"]) / 24


def test_regression_loss_is_squared_error():
    model = _model(num_classes=1, pooling="mean")
    params, ids = _params(model), _tokens(4)
    ids[3] = 0  # padding row: weight 0 (no weights feature given)
    scores = np.array([[0.5], [-1.0], [2.0], [7.0]], np.float32)
    batch = {"encoder_input_tokens": ids, "classification_labels": scores}

    def run(p):
        loss = functools.partial(MeanSquaredErrorLoss(), model, batch=batch)
        return (model.forward(p, batch)[0][..., 0], loss(p), jax.grad(lambda q: loss(q)["loss"])(p),
                model.eval_sums(p, batch))

    outputs, sums, grads, evaluated = jax.jit(run)(params)
    outputs = np.asarray(outputs)
    expected = float(np.sum((outputs[:3] - scores[:3]) ** 2))
    assert float(sums["tokens"]) == 3
    np.testing.assert_allclose([float(sums["loss"]), float(sums["squared_error"])], [expected] * 2, rtol=1e-5)
    np.testing.assert_allclose(grads["classifier"]["bias"], 2 * np.sum(outputs[:3] - scores[:3]), rtol=1e-4)
    assert set(evaluated) == {"squared_error", "tokens", "nll_sum"}
    np.testing.assert_allclose(float(evaluated["squared_error"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(evaluated["nll_sum"]), 0.5 * expected + 1.5 * math.log(2 * math.pi), rtol=1e-5)
    with pytest.raises(ModelCapabilityError, match="MeanSquaredErrorLoss"):
        CrossEntropyLoss()(model, params, batch)
    three = _model(num_classes=3)
    with pytest.raises(ValueError, match="one output per target"):
        jax.eval_shape(lambda p: MeanSquaredErrorLoss()(three, p, batch), three.param_shapes())


def test_flops_count_the_encoder_per_token_and_the_head_once():
    model = _model(num_classes=3)
    params = _params(model)
    lengths = model.feature_lengths({"inputs": 8, "targets": 1})
    assert lengths == {"encoder_input_tokens": 8, "classification_labels": 1, "classification_weights": 1}
    longer = model.flops_per_example(params, {"encoder_input_tokens": 9})
    head = 6 * (16 * 16 + 16 * 3)
    encoder_per_token = (longer - model.flops_per_example(params, {"encoder_input_tokens": 8}))
    assert model.flops_per_example(params, {"encoder_input_tokens": 1}) > head
    assert encoder_per_token > 6 * (4 * 16 * 16 + 2 * 16 * 32)  # one layer
    assert model.max_length() == 16


# ---------------------------------------------------------------------------- a user's seqio task

EXAMPLES = [("a good film", 2), ("so so", 1), ("bad", 0), ("great acting and a good plot, long", 2), ("dull", 0)]


def _register(name, dtype, values):
    vocab = vocabularies.get_vocabulary("byte")

    def source(split, shuffle_files=False, seed=None):
        return tf.data.Dataset.from_tensor_slices({"inputs": [t for t, _ in EXAMPLES],
                                                   "targets": tf.constant(values, dtype)})

    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(source, splits=("train", "validation")),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features={"inputs": seqio.Feature(vocab, add_eos=True),
                         "targets": seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False, dtype=dtype,
                                                  rank=0)})
    return name


@pytest.fixture(scope="module")
def sentiment_task():
    return _register("test_classifier_sentiment", tf.int32, [c for _, c in EXAMPLES])


def _batches(task, model, lengths, batch_size=2):
    ds = iterators.get_dataset(task, lengths, split="validation", batch_size=batch_size, shuffle=False,
                               num_epochs=1, drop_remainder=False, model=model)
    return list(ds.as_numpy_iterator())


@pytest.mark.parametrize("lengths", [{"inputs": 8}, {"inputs": 8, "targets": 1}])
def test_converter_reads_a_user_task(sentiment_task, lengths):
    model = _model(num_classes=3)
    batches = _batches(sentiment_task, model, lengths)
    assert len(batches) == 3 and set(batches[0]) == {"encoder_input_tokens", "classification_labels",
                                                     "classification_weights"}
    ids = np.concatenate([b["encoder_input_tokens"] for b in batches])
    labels = np.concatenate([b["classification_labels"] for b in batches])
    weights = np.concatenate([b["classification_weights"] for b in batches])
    assert ids.shape == (6, 8) and labels.shape == (6, 1) and labels.dtype == np.int32
    np.testing.assert_array_equal(labels[:5, 0], [c for _, c in EXAMPLES])
    np.testing.assert_array_equal(weights[:, 0], [1, 1, 1, 1, 1, 0])  # the padding row weighs nothing
    vocab = vocabularies.get_vocabulary("byte")
    np.testing.assert_array_equal(ids[2], vocab.encode("bad") + [vocab.eos_id] + [0] * 4)  # EOS, padded
    np.testing.assert_array_equal(ids[3], vocab.encode("great a") + [vocab.eos_id])  # cut, then EOS
    np.testing.assert_array_equal(model.targets_and_weights(batches[2])[1], [[1.0], [0.0]])


def test_converter_refuses_bad_labels(sentiment_task):
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside"):
        _batches(sentiment_task, _model(num_classes=2), {"inputs": 8})
    floats = _register("test_classifier_float_targets", tf.float32, [0.5] * len(EXAMPLES))
    with pytest.raises(ValueError, match="scalar 'targets'"):
        _batches(floats, _model(num_classes=3), {"inputs": 8})


def test_regression_evaluation_reports_squared_error():
    from t5x_like import evaluation, partitioning

    scores = np.array([0.5, -1.0, 2.0, 0.0, 1.5], np.float32)
    task = _register("test_classifier_scores", tf.float32, scores.tolist())
    model = _model(num_classes=1, pooling="mean")
    batches = _batches(task, model, {"inputs": 8}, batch_size=8)  # one batch, 3 padding rows
    assert len(batches) == 1 and batches[0]["classification_labels"].dtype == np.float32
    # A head that predicts 0.25 for every row, so the expected error needs no forward pass here.
    params = dict(_params(model))
    params["classifier"] = {"kernel": np.zeros((16, 1), np.float32), "bias": np.full((1,), 0.25, np.float32)}
    evaluator = evaluation.Evaluator(model, task, {"inputs": 8}, batch_size=8, mesh=partitioning.create_mesh(),
                                     max_batches=None)
    results = evaluator.evaluate(params)[task]
    expected = float(np.mean((scores - 0.25) ** 2))
    assert results["tokens"] == 5 and "accuracy" not in results
    np.testing.assert_allclose(results["squared_error"], expected, rtol=1e-5)
    assert results["perplexity"] == pytest.approx(math.exp(0.5 * expected + 0.5 * math.log(2 * math.pi)), rel=1e-5)


# ------------------------------------------------------------------- fine-tuning a pretrained encoder


def test_fine_tuning_restores_the_encoder_and_starts_the_head_fresh(tmp_path):
    from t5x_like import partitioning
    from t5x_like.training import trainer
    from t5x_like.training.checkpointing import save_params
    from t5x_like.training.train_state import sharded_abstract_state

    mlm = model_for_config(EncoderOnlyConfig(**BERT))
    pretrained = jax.tree_util.tree_map(np.asarray, mlm.init_variables(jax.random.key(7))["params"])
    save_params(str(tmp_path / "checkpoints"), 0, pretrained)  # as import_hf writes it, masked-LM head included

    model = _model(num_classes=3)
    opt = optimizers.Optimizer(optax.sgd(0.1), optax.constant_schedule(0.1))
    shapes = {"encoder_input_tokens": (2, 8), "classification_labels": (2, 1), "classification_weights": (2, 1)}
    mesh = partitioning.create_mesh()
    target, shardings = sharded_abstract_state(model, opt, shapes, mesh)
    state = trainer._fresh_state(model, opt, shapes, mesh, target, shardings, 0, str(tmp_path))
    restored, head = model.split_fresh_params(jax.device_get(state.params))
    encoder = {k: v for k, v in pretrained.items() if not k.startswith("mlm")}
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(encoder)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(encoder)):
        np.testing.assert_array_equal(a, b)
    assert sorted(head) == ["classifier", "pooler"] and head["classifier"]["kernel"].shape == (16, 3)
    assert float(np.abs(head["pooler"]["kernel"]).sum()) > 0  # initialised, not restored


# ---------------------------------------------------------------------------- Hugging Face


def test_hf_sequence_classification_parity_and_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from t5x_like.interop import hf

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
                                     vocab_size=120, max_position_embeddings=32, num_labels=3)
    ref_model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():  # perturbed norms and biases, so a mis-mapped one cannot hide as 1 or 0
        for name, p in ref_model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    ref_model.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    model, variables = hf.load(str(tmp_path / "hf"))
    assert isinstance(model, EncoderClassifierModel) and model.config.num_classes == 3

    ids = _tokens(3, 16, seed=1) % 120
    ids[:, 0] = 101
    types = np.zeros_like(ids)
    types[0, 8:] = 1

    def reference(m):
        with torch.no_grad():
            return m(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(ids != 0),
                     token_type_ids=torch.tensor(types, dtype=torch.long)).logits.numpy()

    ref = reference(ref_model)
    ours = np.asarray(model.compute_logits(variables, {"encoder_input_tokens": ids, "encoder_token_types": types}))
    assert ours.shape == (3, 1, 3)
    assert np.max(np.abs(ours[:, 0] - ref)) / np.max(np.abs(ref)) < 1e-4

    hf.save(model, variables, str(tmp_path / "out"))
    reloaded = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
    assert reloaded.config.num_labels == 3
    np.testing.assert_allclose(reference(reloaded), ref, atol=1e-6)
