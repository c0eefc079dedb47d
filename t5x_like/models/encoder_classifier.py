"""A BERT-style encoder with a classification (or regression) head on one pooled token.

The config, the network, the model (models/base.py) and the seqio feature converter that turns a
supervised task into its batches. Fine-tuning a pretrained encoder: `train.init_checkpoint` names a
masked-LM checkpoint (trained with the `mlm` objective, or `import_hf` of a BERT); the encoder
restores from it and the head (`pooler`, `classifier`) starts fresh (`fresh_params_regex`).
Hugging Face's BertForSequenceClassification imports and exports as this model (interop/hf_bert.py).

The network: the encoder of `EncoderOnly` (no masked-LM head), then the pooled token (`pooling`:
"first", BERT's [CLS] position, or "mean" over the non-padding tokens) through BERT's pooler
(dense + tanh), dropout, and the classifier dense layer to `num_classes` logits. Outputs have a
length-1 "sequence" axis, [batch, 1, num_classes], with the labels as [batch, 1], so the token
cross-entropy (z-loss, label smoothing, the fused loss), accuracy and evaluation apply unchanged.
`num_classes=1` regresses a score: train it with `train.loss = @MeanSquaredErrorLoss()`
(objectives/regression.py); its evaluation reports `squared_error` (the mean per example).

A user task, registered with `seqio.TaskRegistry.add` in a module the gin file imports:

    seqio.TaskRegistry.add(
        "my_sentiment",
        source=...,  # examples {"inputs": text, "targets": class id (or a float score)}
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features={
            "inputs": seqio.Feature(vocabulary, add_eos=True),
            "targets": seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False,
                                     dtype=tf.int32, rank=0)})  # tf.float32 for a score

`tokenize` passes "targets" through (its vocabulary encodes as the identity); `add_eos=False` keeps
the EOS preprocessors off the scalar. TASK_FEATURE_LENGTHS needs only "inputs" (e.g.
`{'inputs': 128}`): a scalar has no length, and one given for "targets" is dropped. Inputs longer
than that are cut, shorter ones padded; each example is one row (no packing). For a BERT checkpoint
tokenize the inputs as BERT does ([CLS] first, [SEP] last: "first" pools the [CLS] position).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional, Sequence

import gin
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf

from t5x_like.layers.dense import DenseGeneral
from t5x_like.layers.lora import LoraConfig
from t5x_like.models.base import BaseModel, ModelCapabilityError
from t5x_like.models.config import EncoderOnlyConfig
from t5x_like.models.encoder_only import EncoderOnly
from t5x_like.models.flops import attention_flops, matmul_params
from t5x_like.models.registry import register
from t5x_like.models.transformer import dtypes
from t5x_like.objectives.fused_cross_entropy import OutputHead
from t5x_like.objectives.regression import squared_error_sums

POOLINGS = ("first", "mean")
# The parameters the head adds to the encoder: fresh when fine-tuning a pretrained encoder.
HEAD_REGEX = r"^(pooler|classifier)/"
LABELS, WEIGHTS = "classification_labels", "classification_weights"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EncoderClassifierConfig(EncoderOnlyConfig):
    """`EncoderOnlyConfig` (its masked-LM head fields unused) plus the head: `num_classes` logits
    (1: one regressed score) from the `pooling` token ("first" or "mean")."""

    num_classes: int = 2
    pooling: str = "first"

    def __post_init__(self):
        super().__post_init__()
        self._check(self.num_classes >= 1, f"num_classes={self.num_classes} must be >= 1 (1: regression)")
        self._check(self.pooling in POOLINGS, f"pooling={self.pooling!r}; use one of {POOLINGS}")


class EncoderClassifier(EncoderOnly):
    config: EncoderClassifierConfig

    def setup(self):
        cfg = self.config
        dtype, param_dtype = dtypes(cfg)
        self.setup_encoder()
        self.pooler = DenseGeneral(cfg.d_model, ("embed", "mlp"), use_bias=True, dtype=dtype, param_dtype=param_dtype)
        self.classifier = DenseGeneral(cfg.num_classes, ("mlp", "classes"), use_bias=True, dtype=dtype,
                                       param_dtype=param_dtype)

    def __call__(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None,
                 encoder_token_types=None, deterministic: bool = True, return_hidden: bool = False):
        """float32 logits [batch, 1, num_classes], or with `return_hidden` the pooled hidden state
        [batch, 1, d_model] the classifier projects (`output_head`)."""
        x = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions, encoder_token_types,
                        deterministic)
        if self.config.pooling == "first":
            x = x[:, :1]
        else:
            real = (encoder_input_tokens > 0)[..., None].astype(jnp.float32)
            total = jnp.sum(x.astype(jnp.float32) * real, axis=1, keepdims=True)
            x = (total / jnp.maximum(jnp.sum(real, axis=1, keepdims=True), 1.0)).astype(x.dtype)
        x = self.dropout(jnp.tanh(self.pooler(x)), deterministic)
        return x if return_hidden else self.classifier(x).astype(jnp.float32)

    def output_head(self) -> OutputHead:
        params = self.classifier.variables["params"]
        return OutputHead(params["kernel"], bias=params["bias"])


class ClassificationFeatureConverter(seqio.FeatureConverter):
    """One example per row: "inputs" cut or padded to their task length as encoder_input_tokens,
    the scalar "targets" as classification_labels [1] (int32 class ids in [0, num_classes), or a
    float32 score when num_classes=1) and classification_weights [1] = 1 (padding rows that
    evaluation appends are all zeros, so they weigh 0). Never packs."""

    TASK_FEATURES = {"inputs": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}
    MODEL_FEATURES = {"encoder_input_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                      LABELS: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                      WEIGHTS: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, num_classes: int = 2, **kwargs):
        super().__init__(pack=False, **kwargs)
        self.num_classes = int(num_classes)
        self.label_dtype = tf.float32 if self.num_classes == 1 else tf.int32
        self.MODEL_FEATURES = {**type(self).MODEL_FEATURES,
                               LABELS: seqio.FeatureConverter.FeatureSpec(dtype=self.label_dtype)}

    def _check_targets(self, ds: tf.data.Dataset) -> None:
        spec = ds.element_spec.get("targets")
        what = "a float score (num_classes=1)" if self.num_classes == 1 else "an integer class id"
        if spec is None or spec.shape.rank != 0 or not (spec.dtype.is_integer or
                                                         (self.num_classes == 1 and spec.dtype.is_floating)):
            got = "no 'targets'" if spec is None else f"'targets' of rank {spec.shape.rank} and dtype {spec.dtype.name}"
            raise ValueError(f"a classifier's task needs a scalar 'targets', {what}, per example (seqio.Feature("
                             "seqio.PassThroughVocabulary(size=0), add_eos=False, dtype=tf.int32, rank=0); see "
                             f"t5x_like/models/encoder_classifier.py); its examples have {got}")

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        self._check_targets(ds)
        length, num_classes = int(task_feature_lengths["inputs"]), self.num_classes

        def convert(features):
            inputs = features["inputs"][:length]
            inputs = tf.ensure_shape(tf.pad(inputs, [[0, length - tf.shape(inputs)[0]]]), [length])
            label = tf.reshape(tf.cast(features["targets"], self.label_dtype), [1])
            if num_classes > 1:
                message = f"a class id of the task is outside [0, num_classes={num_classes})"
                checks = [tf.debugging.assert_non_negative(label, message=message),
                          tf.debugging.assert_less(label, num_classes, message=message)]
                with tf.control_dependencies(checks):
                    label = tf.identity(label)
            return {"encoder_input_tokens": inputs, LABELS: label, WEIGHTS: tf.ones([1], tf.int32)}

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        return {"encoder_input_tokens": task_feature_lengths["inputs"], LABELS: 1, WEIGHTS: 1}


@register(EncoderClassifierConfig)
@gin.configurable
class EncoderClassifierModel(BaseModel):
    """Sequence classification (or regression, num_classes=1) with a BERT-style encoder."""

    network_cls = EncoderClassifier
    head_regex = HEAD_REGEX
    required_features = ("encoder_input_tokens",)
    optional_features = ("encoder_segment_ids", "encoder_positions", "encoder_token_types")
    targets_feature = LABELS
    weights_feature = WEIGHTS

    def __init__(self, config: EncoderClassifierConfig = gin.REQUIRED, lora: Optional[LoraConfig] = None,
                 weight_quantization: Optional[str] = None, quantize_embeddings: bool = False,
                 quantized_matmul: str = "dequantize"):
        super().__init__(config, lora, weight_quantization, quantize_embeddings, quantized_matmul)

    @property
    def regression(self) -> bool:
        return self.config.num_classes == 1

    # ------------------------------------------------------------ features

    def feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        return {"encoder_input_tokens": task_feature_lengths["inputs"], LABELS: 1, WEIGHTS: 1}

    def feature_converter(self, task_features: Sequence[str], pack: bool = True):
        """`ClassificationFeatureConverter` (never packs, whatever `pack` says)."""
        if "inputs" not in task_features:
            raise ModelCapabilityError(f"{type(self).__name__} classifies a task's 'inputs', but the task has only "
                                       f"{list(task_features)}")
        return ClassificationFeatureConverter(self.config.num_classes)

    def targets_and_weights(self, batch: Mapping):
        """Labels [batch, 1] (int32 class ids, float32 scores when regressing) and weights: the
        batch's, else 1 for every row holding any input token (all-zero padding rows weigh 0)."""
        if self.targets_feature not in batch:
            raise KeyError(f"{type(self).__name__} needs {self.targets_feature!r} in the batch to compute a "
                           f"loss; got features {sorted(batch)}")
        targets = jnp.asarray(batch[self.targets_feature]).astype(jnp.float32 if self.regression else jnp.int32)
        weights = batch.get(self.weights_feature)
        if weights is None:
            weights = jnp.any(jnp.asarray(batch["encoder_input_tokens"]) != 0, axis=-1, keepdims=True)
        return targets, jnp.asarray(weights).astype(jnp.float32)

    def random_batch(self, batch_size: int, length: int, seed: int = 0) -> dict:
        rng = np.random.default_rng(seed)
        labels = (rng.normal(size=(batch_size, 1)).astype(np.float32) if self.regression
                  else rng.integers(0, self.config.num_classes, (batch_size, 1), dtype=np.int32))
        return {"encoder_input_tokens": rng.integers(1, self.config.vocab_size, (batch_size, length), dtype=np.int32),
                LABELS: labels}

    # ------------------------------------------------------------ parameters

    def output_head(self, params) -> OutputHead:
        if self.regression:
            raise ModelCapabilityError("a classifier with num_classes=1 regresses a score: train it with "
                                       "train.loss = @MeanSquaredErrorLoss(), not cross-entropy")
        return super().output_head(params)

    # ------------------------------------------------------------ evaluation and cost

    def eval_sums(self, params, batch: Mapping) -> dict:
        """Classification: nll_sum, tokens (examples) and correct, as every model. Regression:
        squared_error and tokens, and nll_sum as a unit-variance Gaussian's negative
        log-likelihood, (y - y')^2 / 2 + log(2 pi) / 2 per example, so "perplexity" (which the
        trainer ranks checkpoints by) orders runs as the squared error does."""
        if not self.regression:
            return super().eval_sums(params, batch)
        outputs = self.compute_logits({"params": params}, batch)[..., 0]
        targets, weights = self.targets_and_weights(batch)
        sums = squared_error_sums(outputs, targets, weights)
        nll = 0.5 * sums["squared_error"] + 0.5 * math.log(2 * math.pi) * sums["tokens"]
        return {"squared_error": sums["squared_error"], "tokens": sums["tokens"], "nll_sum": nll}

    def flops_per_example(self, params, feature_lengths: Mapping[str, int]) -> float:
        """The encoder over every input position, the head once per example."""
        cfg, length = self.config, feature_lengths["encoder_input_tokens"]
        head = {k: v for k, v in params.items() if k in ("pooler", "classifier")}
        encoder = {k: v for k, v in params.items() if k not in head}
        flops = 6 * matmul_params(encoder, cfg) * length + 6 * matmul_params(head, cfg)
        return float(flops + attention_flops(cfg, cfg.num_layers, length, length, causal=False))
