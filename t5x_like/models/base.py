"""The model contract: a model owns everything specific to its type (as T5X's `BaseModel` does).

Training, evaluation, scoring, decoding, precompile, FLOPs and the demo call only these methods, so
a new family is one module that subclasses `BaseModel`, fills in the family-specific parts, and
registers itself (models/registry.py); nothing outside `models/` switches on the model type.

What a family provides:
- the features it reads: `required_features`, `optional_features`, `targets_feature`,
  `weights_feature`, and `feature_lengths(task_feature_lengths)` (names and lengths of a packed
  batch, which `batch_shapes` and precompile's abstract batch are built from);
- `scoring_batch(inputs, targets)` and `prompt_ids(ids, bos_id)`: how (input, target) pairs and
  prompts become its features;
- decoding (`can_decode`): `prefill`, `init_cache`, `decode_step` (or `decode_chunk` with
  `can_prefill`: whole prompts in one pass), `decode_logits`;
- `flops_per_example(params, feature_lengths)`.
What every family shares lives here: init, logical axes, the forward pass, the MoE auxiliary losses
folded into any objective's sums (`fold_aux_losses`), evaluation sums and per-example scores.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.layers import kv_cache, quantization
from t5x_like.layers.lora import TRAINABLE_REGEX, LoraConfig, LoraModule
from t5x_like.layers.moe import collect_moe_aux
from t5x_like.objectives.cross_entropy import cross_entropy_sums
from t5x_like.objectives.fused_cross_entropy import OutputHead
from t5x_like.objectives.metrics import EVAL_SUM_KEYS
from t5x_like.errors import UserError


class ModelCapabilityError(UserError):
    """The model cannot do what was asked (e.g. generate text from an encoder-only model)."""


class DecodeStart(NamedTuple):
    """What `prefill` hands the decoding loop: the model's fixed context (an encoder-decoder's
    encoded inputs; None for decoder-only), the decoder prefix rows [rows, length] and their
    real lengths [rows] (tokens the loop feeds before it generates)."""

    context: Any
    prefix: jax.Array
    lengths: jax.Array


class BaseModel:
    """Subclasses set the class attributes below and implement the family-specific methods."""

    network_cls: type[nn.Module]
    required_features: tuple[str, ...]
    optional_features: tuple[str, ...] = ()
    targets_feature: str = "decoder_target_tokens"
    weights_feature: str = "decoder_loss_weights"
    can_decode: bool = False
    # decode_chunk takes k tokens per row at per-row positions: prompts are prefilled in one pass.
    can_prefill: bool = False
    # Parameters a fine-tuning head adds on top of a pretrained backbone (a regex over '/'-joined
    # paths): they start fresh from a pretrained checkpoint, train in full under LoRA, stay unquantized.
    head_regex: Optional[str] = None

    def __init__(self, config, lora: Optional[LoraConfig] = None, weight_quantization: Optional[str] = None,
                 quantize_embeddings: bool = False, quantized_matmul: str = "dequantize"):
        """`lora`: LoRA adapters on the dense kernels it targets (layers/lora.py); the network is then
        a `LoraModule` and its params hold `lora_a` / `lora_b` beside each adapted kernel.
        `weight_quantization` ("nf4", "int4", "int8"): dense kernels are stored quantized
        (layers/quantization.py) and dequantized as each layer runs; frozen, as in QLoRA.
        `quantize_embeddings`: with `weight_quantization`, the embedding tables and the untied output
        projection `logits_dense` are stored quantized too (a `quantize` serving checkpoint); off,
        they stay float as QLoRA keeps them.
        `quantized_matmul`: how `DenseGeneral` multiplies by a quantized kernel: "dequantize"
        (weight-only, exact) or "int8" (int8 / int4 weights: dynamic per-token int8 activations and
        an integer dot, layers/quantized_matmul.py; the faster decode on CPU)."""
        if weight_quantization is not None and weight_quantization not in quantization.SCHEMES:
            raise ModelCapabilityError(f"weight_quantization={weight_quantization!r} is not one of "
                                       f"{list(quantization.SCHEMES)} (or None)")
        if quantized_matmul != "dequantize" and weight_quantization is None:
            raise ModelCapabilityError(f"quantized_matmul={quantized_matmul!r} needs weight_quantization "
                                       "'int8' or 'int4' (a quantize output's model.gin binds it)")
        try:
            quantization.check_matmul(weight_quantization, quantized_matmul)
        except ValueError as e:
            raise ModelCapabilityError(f"quantized_matmul={quantized_matmul!r}: {e}") from None
        self.config = config
        self.lora = lora
        self.weight_quantization = weight_quantization
        self.quantize_embeddings = bool(quantize_embeddings)
        self.quantized_matmul = quantized_matmul
        self.module = self.network_cls(config)
        if lora is not None:
            self.module = LoraModule(self.module, lora)

    def __repr__(self):
        return f"{type(self).__name__}({self.config})"

    # ------------------------------------------------------------ features

    def feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        """Feature name -> row length of a packed training batch for these task feature lengths."""
        raise NotImplementedError

    def batch_shapes(self, task_feature_lengths: Mapping[str, int], batch_size: int) -> dict:
        """Feature name -> (batch_size, length): the batch a train step compiles for, without data."""
        return {k: (batch_size, n) for k, n in self.feature_lengths(task_feature_lengths).items()}

    def feature_converter(self, task_features: Sequence[str], pack: bool = True):
        """The seqio converter that turns a supervised task's examples (features "inputs" and/or
        "targets", as `seqio.TaskRegistry.add` defines them) into this model's batch, as T5X's
        `FEATURE_CONVERTER_CLS`; used for tasks registered with seqio directly (fine-tuning)."""
        raise ModelCapabilityError(f"{type(self).__name__} cannot be fine-tuned on a supervised seqio task")

    def max_length(self) -> Optional[int]:
        """The longest row (in positions) the model can read, or None for no limit. A learned
        position table (`position_embedding="learned"`, shared by every family through
        `NetworkBase`) holds `max_position_embeddings` rows; relative, rotary and sinusoidal
        positions take any length. A family with another limit overrides this."""
        if getattr(self.config, "position_embedding", None) == "learned":
            return int(self.config.max_position_embeddings)
        return None

    def _inputs(self, batch: Mapping[str, np.ndarray]) -> dict:
        missing = [k for k in self.required_features if k not in batch]
        if missing:
            raise KeyError(f"{type(self).__name__} batch is missing features {missing}; "
                           f"expected {list(self.required_features)} (optional: {list(self.optional_features)})")
        names = self.required_features + self.optional_features
        return {k: jnp.asarray(batch[k]) for k in names if k in batch and batch[k] is not None}

    def targets_and_weights(self, batch: Mapping):
        """Integer targets and float loss weights; weights default to non-padding (targets > 0)."""
        if self.targets_feature not in batch:
            raise KeyError(f"{type(self).__name__} needs {self.targets_feature!r} in the batch to compute a "
                           f"loss; got features {sorted(batch)}")
        targets = jnp.asarray(batch[self.targets_feature])
        weights = batch.get(self.weights_feature)
        weights = (targets > 0) if weights is None else jnp.asarray(weights)
        return targets, weights.astype(jnp.float32)

    def dummy_batch(self, batch_size: int = 1, length: int = 8) -> dict:
        return {k: np.ones((batch_size, length), np.int32) for k in self.required_features}

    def random_batch(self, batch_size: int, length: int, seed: int = 0) -> dict:
        """Random non-pad tokens for every feature the forward pass requires, and the targets."""
        rng = np.random.default_rng(seed)
        names = dict.fromkeys(self.required_features + (self.targets_feature,))
        return {k: rng.integers(1, self.config.vocab_size, (batch_size, length), dtype=np.int32) for k in names}

    # ------------------------------------------------------------ variables and the forward pass

    def _init_fn(self, rng, batch):
        return self.module.init({"params": rng, "dropout": rng}, **self._inputs(batch))

    def init_variables(self, rng, batch: Optional[Mapping] = None, quantized: bool = True) -> dict:
        """Fresh variables (plain arrays); `batch` only fixes shapes, defaults to a dummy one. With
        `weight_quantization`, dense kernels come quantized unless `quantized=False`."""
        batch = self.dummy_batch() if batch is None else batch
        variables = nn.unbox(jax.jit(self._init_fn)(rng, batch))
        return {**variables, "params": self.quantize_params(variables["params"])} if quantized else variables

    def quantize_params(self, params):
        """`params` in the form this model stores them: dense kernels quantized under
        `weight_quantization` (a pretrained float checkpoint restored for QLoRA goes through here),
        with `quantize_embeddings` the embedding tables and `logits_dense` too; a fine-tuning head
        (`head_regex`, trained in full) stays unquantized."""
        if self.weight_quantization is None:
            return params
        if self.quantize_embeddings:
            targets, exclude = quantization.WITH_EMBEDDINGS_REGEX, self.head_regex
        else:
            targets = quantization.KERNELS_REGEX
            exclude = quantization.OUTPUT_PROJECTION_REGEX + (f"|{self.head_regex}" if self.head_regex else "")
        return quantization.quantize_params(params, self.weight_quantization, targets_regex=targets,
                                            exclude_regex=exclude, matmul=self.quantized_matmul)

    def param_shapes(self, batch: Optional[Mapping] = None, quantized: bool = True):
        """ShapeDtypeStructs of the 'params' tree (nothing allocated): restore and conversion targets."""
        return jax.eval_shape(lambda: self.init_variables(jax.random.key(0), batch, quantized))["params"]

    def logical_axes(self, batch: Optional[Mapping] = None, quantized: bool = True):
        """The variables' logical axis names as a pytree of PartitionSpecs (nothing allocated); a
        quantized kernel's codes and scales are sharded like the kernel."""
        batch = self.dummy_batch() if batch is None else batch
        abstract = jax.eval_shape(self._init_fn, jax.random.key(0), batch)
        axes = nn.get_partition_spec(abstract)
        if quantized and self.weight_quantization is not None:
            axes = {**axes, "params": quantization.quantized_logical_axes(axes["params"], self.param_shapes(batch))}
        return axes

    def compute_logits(self, variables, batch: Mapping, *, dropout_rng=None, deterministic: bool = True):
        """float32 logits [batch, length, vocab]."""
        if not deterministic and dropout_rng is None:
            raise ValueError("compute_logits(deterministic=False) needs a dropout_rng")
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        return self.module.apply(variables, **self._inputs(batch), deterministic=deterministic, rngs=rngs)

    def forward(self, params, batch: Mapping, *, dropout_rng=None, return_hidden: bool = False):
        """(logits, aux), or with `return_hidden` (the output before the projection that
        `output_head` describes, aux). Dropout is on iff `dropout_rng` is given. aux holds the MoE
        router losses and metrics (layers/moe.py), {} without MoE."""
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        out, state = self.module.apply({"params": params}, **self._inputs(batch), deterministic=dropout_rng is None,
                                       rngs=rngs, return_hidden=return_hidden, mutable=["intermediates"])
        return out, collect_moe_aux(state.get("intermediates", {}))

    def compute_logits_and_aux(self, variables, batch: Mapping):
        """(logits, aux) without dropout; see `forward`."""
        return self.forward(variables["params"], batch)

    def output_head(self, params) -> OutputHead:
        """The logits projection's parameters, as the network itself defines them."""
        return self.module.apply({"params": params}, method="output_head")

    def trainable_params_regex(self) -> Optional[str]:
        """Which parameters training updates by default (a regex over '/'-joined paths; None: all).
        A model with adapters trains only those, plus its fine-tuning head (training/trainable.py)."""
        if self.lora is None:
            return None
        return TRAINABLE_REGEX + (f"|{self.head_regex}" if self.head_regex else "")

    def fresh_params_regex(self) -> Optional[str]:
        """Which parameters start fresh when fine-tuning from a pretrained checkpoint
        (`train.init_checkpoint`) instead of being restored from it: a regex over '/'-joined paths
        (None: none). LoRA adapters, and a fine-tuning head (`head_regex`)."""
        parts = [r for r in (TRAINABLE_REGEX if self.lora is not None else None, self.head_regex) if r]
        return "|".join(parts) or None

    def split_fresh_params(self, params) -> tuple[dict, dict]:
        """(pretrained, fresh): `params` (or any tree shaped like them) split by `fresh_params_regex`."""
        regex = self.fresh_params_regex()
        flat = traverse_util.flatten_dict(params, sep="/")
        fresh = {k: v for k, v in flat.items() if regex is not None and re.search(regex, k)}
        pretrained = {k: v for k, v in flat.items() if k not in fresh}
        return traverse_util.unflatten_dict(pretrained, sep="/"), traverse_util.unflatten_dict(fresh, sep="/")

    @staticmethod
    def join_params(pretrained, fresh) -> dict:
        """The inverse of `split_fresh_params`: one tree holding the leaves of both."""
        flat = {**traverse_util.flatten_dict(pretrained, sep="/"), **traverse_util.flatten_dict(fresh, sep="/")}
        return traverse_util.unflatten_dict(flat, sep="/")

    @staticmethod
    def num_params(variables) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(variables.get("params", variables))))

    # ------------------------------------------------------------ losses, evaluation, scores

    def fold_aux_losses(self, sums: dict, aux: Mapping) -> dict:
        """Add the model's auxiliary losses (MoE router losses) to an objective's sums.

        Router losses are per-batch means; weighting them by the token count makes them add like a
        per-token loss, so the default normaliser turns them back into weight x mean, and
        microbatches average them by tokens. They never enter nll_sum (perplexity).
        """
        if not aux:
            return sums
        cfg, tokens = self.config, sums["tokens"]
        router = cfg.moe_aux_loss_weight * aux["moe_aux_loss"] + cfg.moe_z_loss_weight * aux["moe_z_loss"]
        return {**sums, "loss": sums["loss"] + tokens * router, **{k: v * tokens for k, v in aux.items()}}

    def eval_sums(self, params, batch: Mapping) -> dict:
        """Sums for perplexity and accuracy (objectives/metrics.py): no regulariser, no dropout."""
        logits = self.compute_logits({"params": params}, batch)
        targets, weights = self.targets_and_weights(batch)
        sums = cross_entropy_sums(logits, targets, weights)
        return {k: sums[k] for k in EVAL_SUM_KEYS}

    def score(self, params, batch: Mapping) -> jax.Array:
        """Log-likelihood [batch] of each row's weighted targets (a `scoring_batch`)."""
        logits = self.compute_logits({"params": params}, batch)
        targets, weights = self.targets_and_weights(batch)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return jnp.sum(picked * weights, axis=-1)

    def scoring_batch(self, inputs, targets) -> dict:
        """A batch whose weighted targets are `targets` given `inputs` (lists of id lists, no padding)."""
        raise ModelCapabilityError(f"{type(self).__name__} cannot score (input, target) pairs")

    def prompt_ids(self, ids: list[int], bos_id: Optional[int]) -> list[int]:
        """Token ids of a text prompt as the model reads it (BOS, EOS)."""
        raise ModelCapabilityError(f"{type(self).__name__} cannot take text prompts")

    # ------------------------------------------------------------ decoding (can_decode)

    def check_prompts(self, prompts: np.ndarray, prompt_lengths: np.ndarray, max_new_tokens: int) -> Optional[str]:
        """What is wrong with these prompts for this model, or None."""
        return None

    def prefill(self, params, prompts, prompt_lengths, *, beams: int = 1, decoder_start_id: int = 0) -> DecodeStart:
        """Start decoding `prompts` [batch, length], each row repeated `beams` times in the context."""
        raise ModelCapabilityError(f"{type(self).__name__} cannot generate: decoding needs a model with a decoder")

    def init_cache(self, context, rows: int, length: int, kv_cache_dtype: Optional[str] = None,
                   window_slack: int = 0):
        """Empty decoding caches for `rows` rows of up to `length` positions. `kv_cache_dtype`
        "int8" stores keys / values quantized (layers/kv_cache.py); a sliding-window model keeps
        a ring buffer of `sliding_window + window_slack` slots (slack: how far a row may be rolled
        back, e.g. speculative decoding's gamma)."""
        raise NotImplementedError

    def decode_chunk(self, params, cache, context, tokens, positions, length: int, fresh_cache: bool = False):
        """(logits [rows, k, vocab] of the tokens after `tokens` [rows, k] at `positions` [rows, k]
        (-1: padding, not written), new cache). Models with it set `can_prefill`. `fresh_cache`: the
        cache is newly allocated (empty), so the chunk attends to itself only (prefill)."""
        raise NotImplementedError

    def decode_step(self, params, cache, context, tokens, positions, length: int):
        """(logits [rows, vocab] of the token after `tokens` [rows, 1] at `positions`, new cache)."""
        logits, cache = self.decode_chunk(params, cache, context, tokens, positions, length)
        return logits[:, 0], cache

    def prefill_cache(self, params, cache, context, prefix, lengths, length: int):
        """(cache, step context): each row's prefix [rows, P] but its last token written into the cache
        in one chunk (padding after `lengths` skipped); the loop then feeds that last token. `cache`
        must be newly allocated (`init_cache`): the chunk does not attend to it. The
        step context is what later `decode_chunk` calls take (`step_context`)."""
        columns = jnp.arange(prefix.shape[1])[None]
        positions = jnp.where(columns < lengths[:, None] - 1, columns, -1)
        _, cache = self.decode_chunk(params, cache, context, prefix, positions, length, fresh_cache=True)
        return cache, self.step_context(context)

    def step_context(self, context):
        """The context decode steps take once the cache is filled (an encoder-decoder drops its
        encoded inputs: their cross-attention keys / values are in the cache)."""
        return context

    def rollback_cache(self, cache, index):
        """Rows' committed positions set to `index` [rows]; later entries are ignored and overwritten
        (speculative decoding's rejected tokens)."""
        return kv_cache.set_index(cache, index)

    def decode_logits(self, params, context, seq):
        """Logits [rows, length, vocab] of the whole decoder sequence, no cache (the reference path)."""
        raise NotImplementedError

    def reorder_cache(self, cache, index):
        """Gather cache rows (beam search: the beams each new beam came from). Cache leaves are
        [rows, ...], or [layers, rows, ...] when layers are scanned."""
        axis = 1 if getattr(self.config, "scan_layers", False) else 0
        return jax.tree_util.tree_map(lambda x: jnp.take(x, index, axis=axis) if x.ndim > axis + 1 else x, cache)

    def _zero_cache(self, init, slots: Optional[int] = None, kv_cache_dtype: Optional[str] = None):
        """Empty caches shaped like the 'cache' collection `init()` creates (shapes traced, nothing
        run); attention caches get `slots` slots (None: as traced) stored as `kv_cache_dtype`."""
        return kv_cache.relayout(jax.eval_shape(init)["cache"], slots, kv_cache_dtype)

    def _cache_slots(self, length: int, window_slack: int = 0) -> int:
        """A full cache, or a ring buffer of the sliding window (positions that index a relative
        bias table keep the full cache)."""
        cfg = self.config
        window = getattr(cfg, "sliding_window", None)
        if window is None or getattr(cfg, "position_embedding", None) == "relative":
            return length
        return min(length, window + window_slack)

    # ------------------------------------------------------------ cost

    def flops_per_example(self, params, feature_lengths: Mapping[str, int]) -> float:
        """Model FLOPs of one forward+backward pass over one row (DESIGN.md formula); `params` may
        hold ShapeDtypeStructs, `feature_lengths` maps feature names to row lengths."""
        raise NotImplementedError
