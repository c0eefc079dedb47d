"""Architecture configs: one frozen dataclass per model family.

Configs are hashable so Flax modules can hold them as attributes, and every field is a plain
Python value so gin can bind it (`DecoderOnlyConfig.num_layers = 12`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import gin

from t5x_like.errors import UserError
from t5x_like.layers.attention_kernels import IMPLS as ATTENTION_IMPLS
from t5x_like.layers.positions import RopeScaling

POSITION_EMBEDDINGS = ("relative", "rotary", "learned", "sinusoidal", "none")
NORM_TYPES = ("rms", "layer")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "linear")
REMAT_POLICIES = ("none", "full", "minimal", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
MOE_IMPLS = ("dropless", "capacity")


class ConfigError(UserError):
    """A config value that cannot work; the message says which field and what to use instead."""


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Fields shared by all families. Defaults are T5.1.1-small-like."""

    vocab_size: int = 32128
    d_model: int = 512
    num_heads: int = 8
    # Grouped-query attention: key/value heads shared by num_heads // num_kv_heads query heads.
    # None means multi-head attention (num_kv_heads == num_heads); 1 is multi-query.
    num_kv_heads: Optional[int] = None
    head_dim: int = 64
    mlp_dim: int = 2048
    # One entry per input projection; more than one means a gated MLP whose branches are multiplied
    # (('gelu_tanh', 'linear') is GeGLU as in T5.1.1, ('silu', 'linear') is SwiGLU as in LLaMA).
    mlp_activations: tuple[str, ...] = ("relu",)
    norm_type: str = "rms"
    norm_epsilon: float = 1e-6
    norm_position: str = "pre"
    use_bias: bool = False
    position_embedding: str = "relative"
    max_position_embeddings: int = 512
    rotary_theta: float = 10000.0
    # Scaled rotary positions for long contexts (layers/positions.py `RopeScaling`), None: unscaled.
    # gin: DecoderOnlyConfig.rope_scaling = {"rope_type": "yarn", "factor": 4.0,
    #      "original_max_position_embeddings": 2048} (HF's rope_parameters names; HF import fills it).
    rope_scaling: Optional[RopeScaling] = None
    relative_num_buckets: int = 32
    relative_max_distance: int = 128
    # T5 folds 1/sqrt(head_dim) into the query initialisation instead of scaling scores.
    scale_attention_scores: bool = True
    sliding_window: Optional[int] = None
    # Causal self-attention computes scores in query blocks of this many positions, each against
    # the keys up to its last query only: about half the score FLOPs and memory at long lengths
    # (0 or a length it does not divide: one full block; at most 8 blocks, larger ones for long lengths).
    causal_query_block: int = 64
    # Full-sequence attention kernel (layers/attention_kernels.py): "xla" (the blocked path above),
    # "dot_product" (jax.nn.dot_product_attention: cuDNN flash attention on GPU), "pallas" (splash
    # attention on TPU) or "auto" (per backend: cpu xla, gpu dot_product in bf16/f16, tpu pallas).
    # Dropout on the weights and the relative bias need "xla"; "auto" takes it for them. Decoding is XLA.
    attention_impl: str = "auto"
    tie_embeddings: bool = True
    # T5 v1.0 multiplies decoder outputs by d_model**-0.5 before the tied projection.
    scale_tied_logits: bool = False
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    # Mixture of experts (layers/moe.py). num_experts=0: every feed-forward block is dense. Otherwise
    # layer i (0-based, per stack) is MoE when (i + 1) % moe_every_n_layers == 0 (1: all layers;
    # 2: the second, fourth, ... as in GShard/Switch). Scanned stacks need moe_every_n_layers=1.
    num_experts: int = 0
    moe_every_n_layers: int = 1
    moe_top_k: int = 1
    # "dropless": tokens sorted by expert through grouped matmuls, none dropped, experts split over
    # the `expert` mesh axis by all-to-all (layers/moe_dropless.py). "capacity": GShard/Switch one-hot
    # dispatch with moe_capacity_factor and moe_group_size (which only this implementation reads).
    moe_impl: str = "dropless"
    # Slots per expert = ceil(factor x group tokens x k / experts); None never drops a token.
    moe_capacity_factor: Optional[float] = 1.25
    # Tokens routed together (capacity applies per group); None: one group per batch row.
    moe_group_size: Optional[int] = None
    # k > 1: rescale the top-k probabilities to sum to one (Mixtral, GShard).
    moe_renormalize_top_k: bool = True
    # Training-loss weights of the summed per-layer router losses (Switch load balancing, z-loss).
    moe_aux_loss_weight: float = 0.01
    moe_z_loss_weight: float = 0.001

    def _check(self, ok, msg):
        if not ok:
            raise ConfigError(f"{type(self).__name__}: {msg}")

    def __post_init__(self):
        check = self._check
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
        for name in ("vocab_size", "d_model", "num_heads", "head_dim", "mlp_dim"):
            check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        kv = self.kv_heads
        check(kv > 0 and self.num_heads % kv == 0,
              f"num_heads={self.num_heads} is not a multiple of num_kv_heads={kv}; "
              "pick num_kv_heads dividing num_heads")
        check(self.position_embedding in POSITION_EMBEDDINGS,
              f"position_embedding={self.position_embedding!r}; use one of {POSITION_EMBEDDINGS}")
        check(self.norm_type in NORM_TYPES, f"norm_type={self.norm_type!r}; use one of {NORM_TYPES}")
        check(self.norm_position in NORM_POSITIONS,
              f"norm_position={self.norm_position!r}; use one of {NORM_POSITIONS}")
        check(len(self.mlp_activations) >= 1 and all(a in ACTIVATIONS for a in self.mlp_activations),
              f"mlp_activations={self.mlp_activations}; each must be one of {ACTIVATIONS}")
        check(self.remat_policy in REMAT_POLICIES,
              f"remat_policy={self.remat_policy!r}; use one of {REMAT_POLICIES}")
        for name in ("dtype", "param_dtype"):
            check(getattr(self, name) in DTYPES, f"{name}={getattr(self, name)!r}; use one of {DTYPES}")
        check(self.position_embedding != "rotary" or self.head_dim % 2 == 0,
              f"rotary positions need an even head_dim, got {self.head_dim}")
        self._check_rope_scaling()
        check(0.0 <= self.dropout_rate < 1.0, f"dropout_rate={self.dropout_rate} must be in [0, 1)")
        check(self.causal_query_block >= 0, f"causal_query_block={self.causal_query_block} must be >= 0 (0: off)")
        self._check_attention_impl()
        check(self.sliding_window is None or self.sliding_window > 0,
              f"sliding_window={self.sliding_window} must be positive or None")
        if self.position_embedding == "relative":
            # Log-spaced buckets start after num_buckets // 2 exact ones (causal); a smaller
            # max_distance makes the bucket formula divide by log(<= 1) and yield invalid ids.
            check(self.relative_num_buckets >= 4,
                  f"relative_num_buckets={self.relative_num_buckets} must be at least 4")
            check(self.relative_max_distance > self.relative_num_buckets // 2,
                  f"relative_max_distance={self.relative_max_distance} must exceed relative_num_buckets // 2 "
                  f"= {self.relative_num_buckets // 2} (T5 uses 32 buckets, max distance 128)")
        if self.num_experts:
            self._check_moe()
        if self.position_embedding == "learned":
            check(self.max_position_embeddings > 0,
                  f"max_position_embeddings={self.max_position_embeddings} must be positive")

    def _check_attention_impl(self):
        self._check(self.attention_impl in ATTENTION_IMPLS,
                    f"attention_impl={self.attention_impl!r}; use one of {ATTENTION_IMPLS}")
        for needs_xla, what in ((self.dropout_rate > 0, f"dropout_rate={self.dropout_rate}"),
                                (self.position_embedding == "relative", "position_embedding='relative'")):
            self._check(not needs_xla or self.attention_impl in ("auto", "xla"),
                        f"attention_impl={self.attention_impl!r} cannot apply {what} (only the xla path "
                        "does); set attention_impl='auto' or 'xla'")

    def _check_rope_scaling(self):
        """A dict (gin, `model_gin_text`) becomes a hashable `RopeScaling`."""
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        self._check(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling),
                    f"rope_scaling={self.rope_scaling!r} must be None or a dict such as "
                    '{"rope_type": "linear", "factor": 2.0}')
        self._check(self.rope_scaling is None or self.position_embedding == "rotary",
                    f"rope_scaling is set but position_embedding={self.position_embedding!r}; "
                    "it applies to rotary positions only")

    def _check_moe(self):
        check = self._check
        check(self.num_experts >= 1, f"num_experts={self.num_experts} must be >= 0 (0: no MoE)")
        check(1 <= self.moe_top_k <= self.num_experts,
              f"moe_top_k={self.moe_top_k} must be between 1 and num_experts={self.num_experts}")
        check(self.moe_impl in MOE_IMPLS, f"moe_impl={self.moe_impl!r}; use one of {MOE_IMPLS}")
        check(self.moe_every_n_layers >= 1, f"moe_every_n_layers={self.moe_every_n_layers} must be >= 1")
        check(self.moe_capacity_factor is None or self.moe_capacity_factor > 0,
              f"moe_capacity_factor={self.moe_capacity_factor} must be positive or None (no dropping)")
        check(self.moe_group_size is None or self.moe_group_size > 0,
              f"moe_group_size={self.moe_group_size} must be positive or None (one group per row)")
        check(not (self.scan_layers and self.moe_every_n_layers > 1),
              f"scan_layers=True needs identical layers, but moe_every_n_layers={self.moe_every_n_layers} mixes "
              "dense and MoE layers; set scan_layers=False or moe_every_n_layers=1")

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer `index` (0-based, within its stack) has an MoE feed-forward block."""
        return self.num_experts > 0 and (index + 1) % self.moe_every_n_layers == 0

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EncoderDecoderConfig(TransformerConfig):
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_encoder_layers", "num_decoder_layers"):
            self._check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecoderOnlyConfig(TransformerConfig):
    num_layers: int = 8

    def __post_init__(self):
        super().__post_init__()
        self._check(self.num_layers > 0, f"num_layers must be positive, got {self.num_layers}")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EncoderOnlyConfig(TransformerConfig):
    num_layers: int = 8
    # BERT: segment (token type) embeddings, a norm after the embeddings, and a masked-LM head
    # (dense + activation + norm, then the output projection with a bias).
    type_vocab_size: int = 2
    embedding_norm: bool = True
    mlm_head_activation: str = "gelu"

    def __post_init__(self):
        super().__post_init__()
        self._check(self.num_layers > 0, f"num_layers must be positive, got {self.num_layers}")
        self._check(self.type_vocab_size >= 0, f"type_vocab_size={self.type_vocab_size} must be >= 0 (0: none)")
        self._check(self.mlm_head_activation in ACTIVATIONS,
                    f"mlm_head_activation={self.mlm_head_activation!r}; use one of {ACTIVATIONS}")
