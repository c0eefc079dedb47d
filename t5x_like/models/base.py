"""Model wrappers: own a network and the mapping from seqio batches to its inputs.

`compute_logits(variables, batch)` is the one entry point that training, evaluation and decoding
build on; batches use seqio feature-converter names.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import gin

from t5x_like.layers.moe import collect_moe_aux
from t5x_like.models.config import DecoderOnlyConfig, EncoderDecoderConfig, EncoderOnlyConfig
from t5x_like.models.decoder_only import DecoderOnly
from t5x_like.models.encoder_decoder import EncoderDecoder
from t5x_like.models.encoder_only import EncoderOnly


class OutputHead(NamedTuple):
    """logits = (hidden * scale) . weight (+ bias): the projection a fused loss applies itself.
    weight is [vocab, embed] when `vocab_major` (a tied embedding table), else [embed, vocab]."""

    weight: jax.Array
    bias: Optional[jax.Array] = None
    vocab_major: bool = False
    scale: Optional[float] = None


class BaseModel:
    """Subclasses set `network_cls`, `required_features` and `optional_features`."""

    network_cls: type[nn.Module]
    required_features: tuple[str, ...]
    optional_features: tuple[str, ...] = ()

    def __init__(self, config):
        self.config = config
        self.module = self.network_cls(config)

    def __repr__(self):
        return f"{type(self).__name__}({self.config})"

    def _inputs(self, batch: Mapping[str, np.ndarray]) -> dict:
        missing = [k for k in self.required_features if k not in batch]
        if missing:
            raise KeyError(f"{type(self).__name__} batch is missing features {missing}; "
                           f"expected {list(self.required_features)} (optional: {list(self.optional_features)})")
        names = self.required_features + self.optional_features
        return {k: jnp.asarray(batch[k]) for k in names if k in batch and batch[k] is not None}

    def dummy_batch(self, batch_size: int = 1, length: int = 8) -> dict:
        return {k: np.ones((batch_size, length), np.int32) for k in self.required_features}

    def _init_fn(self, rng, batch):
        return self.module.init({"params": rng, "dropout": rng}, **self._inputs(batch))

    def init_variables(self, rng, batch: Optional[Mapping] = None) -> dict:
        """Fresh variables (plain arrays); `batch` only fixes shapes, defaults to a dummy one."""
        batch = self.dummy_batch() if batch is None else batch
        return nn.unbox(jax.jit(self._init_fn)(rng, batch))

    def logical_axes(self, batch: Optional[Mapping] = None):
        """The variables' logical axis names as a pytree of PartitionSpecs (nothing allocated)."""
        batch = self.dummy_batch() if batch is None else batch
        abstract = jax.eval_shape(self._init_fn, jax.random.key(0), batch)
        return nn.get_partition_spec(abstract)

    def compute_logits(self, variables, batch: Mapping, *, dropout_rng=None, deterministic: bool = True):
        """float32 logits [batch, length, vocab]."""
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        if not deterministic and dropout_rng is None:
            raise ValueError("compute_logits(deterministic=False) needs a dropout_rng")
        return self.module.apply(variables, **self._inputs(batch), deterministic=deterministic, rngs=rngs)

    def compute_logits_and_aux(self, variables, batch: Mapping, *, dropout_rng=None, deterministic: bool = True):
        """(logits, aux): aux holds the MoE router losses and metrics (layers/moe.py), {} without MoE.

        Training adds the weighted losses to its objective; `compute_logits` ignores them.
        """
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        if not deterministic and dropout_rng is None:
            raise ValueError("compute_logits_and_aux(deterministic=False) needs a dropout_rng")
        logits, state = self.module.apply(variables, **self._inputs(batch), deterministic=deterministic, rngs=rngs,
                                          mutable=["intermediates"])
        return logits, collect_moe_aux(state.get("intermediates", {}))

    def compute_hidden_and_aux(self, variables, batch: Mapping, *, dropout_rng=None, deterministic: bool = True):
        """(hidden, aux): the network's output before the logits projection, which `output_head`
        describes, and the MoE aux as in `compute_logits_and_aux`. For losses that project in chunks."""
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        if not deterministic and dropout_rng is None:
            raise ValueError("compute_hidden_and_aux(deterministic=False) needs a dropout_rng")
        hidden, state = self.module.apply(variables, **self._inputs(batch), deterministic=deterministic, rngs=rngs,
                                          return_hidden=True, mutable=["intermediates"])
        return hidden, collect_moe_aux(state.get("intermediates", {}))

    def output_head(self, params) -> OutputHead:
        """The logits projection's parameters in `params` (tied table or dense kernel)."""
        cfg = self.config
        if cfg.tie_embeddings:
            return OutputHead(params["token_embed"]["embedding"], vocab_major=True,
                              scale=cfg.d_model ** -0.5 if cfg.scale_tied_logits else None)
        return OutputHead(params["logits_dense"]["kernel"])

    @staticmethod
    def num_params(variables) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(variables.get("params", variables))))


@gin.configurable
class EncoderDecoderModel(BaseModel):
    network_cls = EncoderDecoder
    required_features = ("encoder_input_tokens", "decoder_input_tokens")
    optional_features = ("decoder_target_tokens", "encoder_segment_ids", "decoder_segment_ids",
                         "encoder_positions", "decoder_positions")

    def __init__(self, config: EncoderDecoderConfig = gin.REQUIRED):
        super().__init__(config)


@gin.configurable
class DecoderOnlyModel(BaseModel):
    network_cls = DecoderOnly
    required_features = ("decoder_input_tokens",)
    optional_features = ("decoder_target_tokens", "decoder_segment_ids", "decoder_positions",
                         "decoder_causal_attention")

    def __init__(self, config: DecoderOnlyConfig = gin.REQUIRED):
        super().__init__(config)


@gin.configurable
class EncoderOnlyModel(BaseModel):
    network_cls = EncoderOnly
    required_features = ("encoder_input_tokens",)
    optional_features = ("encoder_segment_ids", "encoder_positions", "encoder_token_types")

    def __init__(self, config: EncoderOnlyConfig = gin.REQUIRED):
        super().__init__(config)

    def output_head(self, params) -> OutputHead:
        return super().output_head(params)._replace(bias=params["mlm_bias"])


MODEL_FOR_CONFIG = {EncoderDecoderConfig: EncoderDecoderModel, DecoderOnlyConfig: DecoderOnlyModel,
                    EncoderOnlyConfig: EncoderOnlyModel}


def model_for_config(config):
    """The wrapper matching a config's family."""
    return MODEL_FOR_CONFIG[type(config)](config)
