"""Serving a trained model: KV-cached decoding (`decoding.py`) and the `infer` / `score` modes
(`modes.py`). Importing the package registers the modes' gin configurables (gin/runs/infer.gin)."""

from t5x_like.inference.modes import InferenceError, infer, score
