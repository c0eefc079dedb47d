"""A frozen reference model for preference tuning: its own checkpoint, features added per batch.

Full-parameter DPO compares the policy with the model it started from. The reference is not part
of the train state (nothing of it is saved with the policy): `FrozenReference(checkpoint=...)`
restores its params from their own checkpoint path whenever a run starts or resumes, sharded like
the policy's, optionally stored in bfloat16 (half the memory; the forward pass keeps the model's
dtype), and `add_features` computes each row's summed completion log-probability (the
`reference_logps` feature `DPOLoss(reference="features")` reads) on device, under the same mesh,
with no gradient. gin (runs/dpo.gin):

    train.reference = @FrozenReference()
    FrozenReference.checkpoint = %INITIAL_CHECKPOINT
    DPOLoss.reference = 'features'

LoRA-DPO needs none of this: its reference is the same weights with the adapters off.
"""

from __future__ import annotations

from typing import Mapping, Optional

import gin
import jax
import jax.numpy as jnp

from t5x_like import partitioning
from t5x_like.errors import UserError
from t5x_like.objectives.distillation import TEACHER_FEATURE, teacher_logits
from t5x_like.objectives.preference import REFERENCE_FEATURE, reference_logps
from t5x_like.training.checkpointing import restore_params
from t5x_like.training.train_state import abstract_params

DTYPES = ("float32", "bfloat16")


class ReferenceError(UserError):
    """A reference checkpoint or setting that cannot serve as this run's reference model."""


@gin.configurable
class FrozenReference:
    """The reference model's params (restored by `load`) and the per-batch feature they give.

    Subclasses change the feature (`FEATURE`, `_feature_fn`, `feature_shapes`) and the names errors use
    (`ROLE`, `MODEL_SETTING`); restore, dtype and placement stay here."""

    FEATURE = REFERENCE_FEATURE
    ROLE = "reference"              # in error messages: "<ROLE> checkpoint ..."
    MODEL_SETTING = "this run's model"  # what the checkpoint must fit

    def __init__(self, checkpoint: str = gin.REQUIRED, dtype: str = "float32", step: Optional[int] = None):
        if dtype not in DTYPES:
            raise ReferenceError(f"FrozenReference.dtype={dtype!r}; use one of {', '.join(DTYPES)}")
        if not checkpoint:
            raise ReferenceError("FrozenReference.checkpoint is empty; set it to the run or import_hf folder the "
                                 "policy started from (e.g. %INITIAL_CHECKPOINT)")
        self.checkpoint, self.dtype, self.step = checkpoint, dtype, step
        self._params = self._fn = None

    def load(self, model, mesh, batch_shapes: Optional[Mapping] = None) -> "FrozenReference":
        """Restore the reference params onto `mesh`, sharded as the policy's (checked against the model:
        a checkpoint of another architecture or size is a one-line ReferenceError)."""
        target = abstract_params(model, mesh, batch_shapes, quantized=False)
        _, fresh = model.split_fresh_params(target)
        if jax.tree_util.tree_leaves(fresh):
            raise ReferenceError(f"{type(model).__name__} adds fresh parameters (LoRA adapters or a new head) that "
                                 f"no {self.ROLE} checkpoint holds; with LoRA use DPOLoss.reference='adapters_off' "
                                 "and no train.reference")
        try:
            params = restore_params(self.checkpoint, step=self.step, target=target)
        except UserError as e:
            raise ReferenceError(f"{self.ROLE} checkpoint {self.checkpoint} does not fit {self.MODEL_SETTING} "
                                 f"({type(model).__name__}: same architecture and sizes needed): {e}") from None
        if self.dtype == "bfloat16":
            params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
        shardings = jax.tree_util.tree_map(lambda a: a.sharding, target)
        self._params = params
        fn, rank = self._feature_fn(model)
        self._fn = jax.jit(lambda p, batch: fn(_as_float32(p), batch), in_shardings=(shardings, None),
                           out_shardings=partitioning.batch_sharding(mesh, rank))
        return self

    def _feature_fn(self, model):
        """(fn(params, batch) -> the feature, its rank): each row's summed completion log-probability."""
        return (lambda p, batch: reference_logps(model, p, batch)), 1

    @staticmethod
    def feature_shapes(batch_shapes: Mapping[str, tuple]) -> dict:
        """The feature `add_features` adds: one float per row."""
        rows = next(iter(batch_shapes.values()))[0]
        return {REFERENCE_FEATURE: ((rows,), jnp.float32)}

    def add_features(self, batch: Mapping, mesh) -> dict:
        """`batch` (global arrays) plus the feature (`FEATURE`), sharded over the batch axes."""
        if self._fn is None:
            raise RuntimeError(f"{type(self).__name__}.load(model, mesh) must run before add_features")
        with partitioning.activation_context(mesh):
            feature = self._fn(self._params, batch)
        return {**batch, self.FEATURE: feature}


def _as_float32(params):
    """bfloat16-stored reference weights computed in float32 (the model's own dtype decides the math)."""
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, params)


@gin.configurable
class FrozenTeacher(FrozenReference):
    """Distillation's teacher (objectives/distillation.py, gin/runs/draft_distill.gin): a frozen model of
    its own config (`model`, e.g. the target a draft learns from), restored from `checkpoint` as
    FrozenReference restores a reference (never saved with the run), adding its logits [rows, length,
    vocab] (`teacher_logits`, stored as `logits_dtype`) to every train and eval batch on device.

        train.reference = @FrozenTeacher()
        FrozenTeacher.checkpoint = %TEACHER_CHECKPOINT
        FrozenTeacher.model = %TARGET_MODEL
    """

    FEATURE = TEACHER_FEATURE
    ROLE = "teacher"
    MODEL_SETTING = "FrozenTeacher.model"

    def __init__(self, checkpoint: str = gin.REQUIRED, model=gin.REQUIRED, dtype: str = "float32",
                 logits_dtype: str = "float32", step: Optional[int] = None):
        super().__init__(checkpoint, dtype, step)
        if logits_dtype not in DTYPES:
            raise ReferenceError(f"FrozenTeacher.logits_dtype={logits_dtype!r}; use one of {', '.join(DTYPES)}")
        self.model, self.logits_dtype = model, jnp.dtype(logits_dtype)

    def load(self, model, mesh, batch_shapes: Optional[Mapping] = None) -> "FrozenTeacher":
        """Restore the teacher's params onto `mesh` (sharded by its own logical axes); the student
        `model` must share its vocabulary and batch features."""
        teacher = self.model
        if type(teacher) is not type(model) or teacher.config.vocab_size != model.config.vocab_size:
            raise ReferenceError(f"the teacher ({type(teacher).__name__}, vocabulary {teacher.config.vocab_size}) and "
                                 f"the student ({type(model).__name__}, vocabulary {model.config.vocab_size}) need the "
                                 "same family and vocabulary; set FrozenTeacher.model to the teacher run's MODEL")
        return super().load(teacher, mesh, batch_shapes)

    def _feature_fn(self, model):
        """(fn(params, batch) -> the teacher's logits [rows, length, vocab], 3)."""
        return (lambda p, batch: teacher_logits(model, p, batch, self.logits_dtype)), 3

    def feature_shapes(self, batch_shapes: Mapping[str, tuple]) -> dict:
        """The feature `add_features` adds: the teacher's logits, one vocabulary row per target position."""
        rows, length = batch_shapes[self.model.targets_feature][:2]
        return {TEACHER_FEATURE: ((rows, length, self.model.config.vocab_size), self.logits_dtype)}
