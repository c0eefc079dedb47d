"""Training objectives and the metric sums they report (the loss hook of the train step)."""

from t5x_like.objectives.cross_entropy import (NUM_REAL_TARGET_TOKENS, LossNormalizingFactor, cross_entropy_sums,
                                               loss_normalizer, token_losses)
from t5x_like.objectives.fused_cross_entropy import OutputHead, fused_cross_entropy_sums
from t5x_like.objectives.loss import CrossEntropyLoss, Loss
from t5x_like.objectives.metrics import EVAL_SUM_KEYS, SUM_KEYS, perplexity, summarize
from t5x_like.objectives.preference import DPOLoss, PreferenceError, reference_logps
from t5x_like.objectives.regression import MeanSquaredErrorLoss, squared_error_sums
from t5x_like.objectives.reward import PairwiseRewardLoss, RewardLossError, score_completions
