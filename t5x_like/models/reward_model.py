"""A reward model for RLHF: a scalar head on a decoder-only backbone (TRL's reward models,
Hugging Face's `LlamaForSequenceClassification(num_labels=1)`).

The network is `DecoderOnly`'s embedding and decoder stack; instead of the vocabulary logits a
`reward_head` dense layer (d_model -> 1, no bias, as HF's `score` layer) reads the final hidden
state at ONE position per row, the row's last real token, defined as:
- the last position whose `decoder_loss_weights` is > 0 (the features of a preference pair, of
  `scoring_batch` or of any (inputs, targets) task weight exactly the completion's target tokens);
- without loss weights, the last position whose `decoder_target_tokens` is non-zero (the default
  weights of `targets_and_weights`); without those either, the last position of the row.
A row with no such position (an all-zero padding row) pools position 0; losses give it weight 0.

At that position the decoder has read every input token up to and including it, i.e. the prompt and
the whole completion except its final target token (usually EOS, which the LM layout never feeds
as an input). So the reward equals what an HF sequence classifier reports for `decoder_input_tokens`
cut after that position (HF pools the last non-pad token; tests/models/test_reward_model.py).

Outputs are [batch, 1, 1] float32 (one "logit" per row), so the contract's `forward` works; train
with `train.loss = @PairwiseRewardLoss()` (objectives/reward.py, the Bradley–Terry loss) on a
preference task (`data/preferences.register_preference_task`): its batches are unpacked pairs of
rows from `PreferenceFeatureConverter` around this model's converter. Cross-entropy does not apply
(`output_head` refuses), and rows are never packed (one reward per row).

Starting from a supervised (SFT) decoder-only run: `train.init_checkpoint` restores the backbone
(`token_embed`, `decoder`, ...), the head starts fresh (`fresh_params_regex`), and the SFT run's
`logits_dense` is not read (the reward model has none).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import gin
import jax.numpy as jnp

from t5x_like.layers.dense import DenseGeneral
from t5x_like.layers.lora import LoraConfig
from t5x_like.models.base import ModelCapabilityError
from t5x_like.models.config import DecoderOnlyConfig
from t5x_like.models.decoder_only import DecoderOnly, DecoderOnlyModel
from t5x_like.models.flops import attention_flops, matmul_params
from t5x_like.models.registry import register
from t5x_like.models.transformer import dtypes
from t5x_like.objectives.fused_cross_entropy import OutputHead
from t5x_like.objectives.reward import RewardLossError, pairwise_reward_sums

# The parameters the head adds to the backbone: fresh when starting from a decoder-only checkpoint.
HEAD = "reward_head"
HEAD_REGEX = rf"^{HEAD}/"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RewardModelConfig(DecoderOnlyConfig):
    """`DecoderOnlyConfig` for a reward model (its output-projection fields, `tie_embeddings` and
    `scale_tied_logits`, are unused: the head is a separate d_model -> 1 layer)."""


def last_real_index(decoder_input_tokens, decoder_target_tokens=None, decoder_loss_weights=None):
    """[batch] int32: the position each row's reward is read at (see the module docstring)."""
    batch, length = decoder_input_tokens.shape
    if decoder_loss_weights is not None:
        real = decoder_loss_weights > 0
    elif decoder_target_tokens is not None:
        real = decoder_target_tokens != 0
    else:
        real = jnp.ones((batch, length), bool)
    return jnp.max(jnp.where(real, jnp.arange(length, dtype=jnp.int32), 0), axis=-1)


class RewardNetwork(DecoderOnly):
    config: RewardModelConfig

    def setup(self):
        super().setup()
        dtype, param_dtype = dtypes(self.config)
        self.reward_head = DenseGeneral(1, ("embed", "reward"), dtype=dtype, param_dtype=param_dtype)

    def __call__(self, decoder_input_tokens, decoder_target_tokens=None, decoder_loss_weights=None,
                 decoder_segment_ids=None, decoder_positions=None, decoder_causal_attention=None,
                 deterministic: bool = True, return_hidden: bool = False):
        """float32 rewards [batch, 1, 1], or with `return_hidden` the pooled hidden state
        [batch, 1, d_model] the head projects."""
        x = DecoderOnly.__call__(self, decoder_input_tokens, None, decoder_segment_ids, decoder_positions,
                                 decoder_causal_attention, deterministic, return_hidden=True)
        index = last_real_index(decoder_input_tokens, decoder_target_tokens, decoder_loss_weights)
        pooled = jnp.take_along_axis(x, index[:, None, None], axis=1)
        return pooled if return_hidden else self.reward_head(pooled).astype(jnp.float32)

    def output_head(self) -> OutputHead:
        return OutputHead(self.reward_head.variables["params"]["kernel"])


@gin.configurable
def reward_model_from(model=gin.REQUIRED) -> "RewardModel":
    """A RewardModel with the backbone of decoder-only `model` (an SFT run's MODEL, with its LoRA and
    quantization settings): gin/runs/reward_model.gin binds `MODEL = @reward_model_from()` after the
    SFT run's model.gin, so the reward model is built from that run's own config."""
    if not isinstance(model.config, DecoderOnlyConfig) or isinstance(model, RewardModel):
        raise ModelCapabilityError(f"reward_model_from needs a decoder-only model (the SFT run's MODEL); got "
                                   f"{type(model).__name__}")
    fields = {f.name: getattr(model.config, f.name) for f in dataclasses.fields(DecoderOnlyConfig)}
    return RewardModel(RewardModelConfig(**fields), lora=model.lora, weight_quantization=model.weight_quantization,
                       quantize_embeddings=model.quantize_embeddings, quantized_matmul=model.quantized_matmul)


def _no_decoding(model):
    return ModelCapabilityError(f"{type(model).__name__} scores sequences with one reward each; it cannot "
                                "generate (decode with the decoder-only policy instead)")


@register(RewardModelConfig)
@gin.configurable
class RewardModel(DecoderOnlyModel):
    """One scalar reward per row from a decoder-only backbone (see the module docstring)."""

    network_cls = RewardNetwork
    head_regex = HEAD_REGEX
    optional_features = ("decoder_target_tokens", "decoder_loss_weights", "decoder_segment_ids",
                         "decoder_positions", "decoder_causal_attention")
    can_decode = False

    def __init__(self, config: RewardModelConfig = gin.REQUIRED, lora: Optional[LoraConfig] = None,
                 weight_quantization: Optional[str] = None, quantize_embeddings: bool = False,
                 quantized_matmul: str = "dequantize"):
        super().__init__(config, lora, weight_quantization, quantize_embeddings, quantized_matmul)

    # ------------------------------------------------------------ features

    def feature_converter(self, task_features: Sequence[str], pack: bool = True):
        """The decoder-only converter, never packed (one reward per row); a preference task wraps it
        in `PreferenceFeatureConverter` (data/tasks.py), which makes the (chosen, rejected) rows."""
        return super().feature_converter(task_features, pack=False)

    # ------------------------------------------------------------ parameters

    def output_head(self, params) -> OutputHead:
        raise ModelCapabilityError("a reward model has no vocabulary projection, so token cross-entropy does not "
                                   "apply: train it with train.loss = @PairwiseRewardLoss() (objectives/reward.py)")

    # ------------------------------------------------------------ scores and evaluation

    def rewards(self, params, batch: Mapping):
        """The reward [rows] of each row, without dropout."""
        return self.compute_logits({"params": params}, batch)[:, 0, 0]

    def score(self, params, batch: Mapping):
        """The reward [rows] of each (input, target) row of a `scoring_batch` (not a log-likelihood)."""
        return self.rewards(params, batch)

    def eval_sums(self, params, batch: Mapping) -> dict:
        """On a preference batch (pairs of rows): `nll_sum` = the Bradley–Terry loss summed over the
        pairs (so "perplexity", which ranks checkpoints, is exp of the mean pairwise loss), `tokens`
        = pairs, `correct` = pairs ranked right (reported as accuracy), `margin`."""
        rewards = self.rewards(params, batch)
        if rewards.shape[0] % 2:
            raise RewardLossError(f"{type(self).__name__} evaluates preference pairs (an even number of rows: "
                                  f"chosen, rejected, ...); got {rewards.shape[0]} rows")
        _, weights = self.targets_and_weights(batch)
        has_weight = jnp.sum(weights, axis=-1) > 0
        sums = pairwise_reward_sums(rewards[0::2], rewards[1::2], has_weight[0::2] & has_weight[1::2])
        return {"nll_sum": sums["loss"], "tokens": sums["tokens"], "correct": sums["accuracy"],
                "margin": sums["margin"]}

    # ------------------------------------------------------------ decoding: none

    def prefill(self, params, prompts, prompt_lengths, *, beams: int = 1, decoder_start_id: int = 0):
        raise _no_decoding(self)

    def init_cache(self, context, rows: int, length: int):
        raise _no_decoding(self)

    def decode_step(self, params, cache, context, tokens, positions, length: int):
        raise _no_decoding(self)

    def decode_logits(self, params, context, seq):
        raise _no_decoding(self)

    # ------------------------------------------------------------ cost

    def flops_per_example(self, params, feature_lengths: Mapping[str, int]) -> float:
        """The backbone over every position, the head once per row (no vocabulary projection)."""
        cfg, length = self.config, feature_lengths["decoder_input_tokens"]
        head = {k: v for k, v in params.items() if k == HEAD}
        backbone = {k: v for k, v in params.items() if k != HEAD}
        flops = 6 * matmul_params(backbone, cfg) * length + 6 * matmul_params(head, cfg)
        return float(flops + attention_flops(cfg, cfg.num_layers, length, length, causal=True))
