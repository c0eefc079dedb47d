"""Serving a trained model: KV-cached decoding (`decoding.py`), the `infer` / `score` modes
(`modes.py`) and generate-and-score evaluation (`generate_eval.py`: the `infer_eval` mode and
`train.infer_eval_every`). Importing the package registers the modes' gin configurables
(gin/runs/infer.gin, score.gin, infer_eval.gin)."""

from t5x_like.inference.generate_eval import (InferEvalError, InferEvaluator, infer_eval,
                                              infer_eval_in_training)
from t5x_like.inference.modes import InferenceError, infer, score
