"""Llama / Mistral sequence classifiers with one label (TRL's reward models) <-> `RewardModel`.

`LlamaForSequenceClassification(num_labels=1)` is the Llama backbone plus a bias-free `score`
layer [1, hidden] read at each row's last non-pad token; `RewardModel` is the same backbone with
`reward_head` [d_model, 1] read at the last weighted position (models/reward_model.py). The
backbone's weights map as `hf_llama`'s; a causal LM's `lm_head` has no counterpart. Exported
configs set `pad_token_id` 0 (t5x_like's padding id), which transformers needs to find each row's
last token in a batch.
"""

from __future__ import annotations

import dataclasses

from t5x_like.interop import hf_llama
from t5x_like.interop.converter import Converter, HFInteropError, WeightReader, register
from t5x_like.models.config import DecoderOnlyConfig
from t5x_like.models.reward_model import HEAD, RewardModelConfig

ARCHITECTURES = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification"}


def config_from_hf(c: dict) -> RewardModelConfig:
    labels = len(c["id2label"]) if c.get("id2label") else int(c.get("num_labels", 2))
    if labels != 1:
        raise HFInteropError(f"{c.get('model_type', 'llama')} config.json: a sequence classifier with {labels} labels; "
                             "t5x_like's RewardModel reads reward models (num_labels=1)")
    base = hf_llama.config_from_hf(c)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(DecoderOnlyConfig)}
    return RewardModelConfig(**{**fields, "tie_embeddings": True})  # no vocabulary projection to read


def params_from_hf(reader: WeightReader, c: RewardModelConfig) -> dict:
    params = hf_llama.params_from_hf(reader, dataclasses.replace(c, tie_embeddings=True))
    params[HEAD] = {"kernel": reader.get("score.weight", (1, c.d_model)).T}
    return params


def config_to_hf(c: RewardModelConfig) -> dict:
    out = hf_llama.config_to_hf(dataclasses.replace(c, tie_embeddings=False))
    out.update(architectures=[ARCHITECTURES[out["model_type"]]], num_labels=1, id2label={"0": "LABEL_0"},
               label2id={"LABEL_0": 0}, pad_token_id=0, tie_word_embeddings=False)
    return out


def params_to_hf(params: dict, c: RewardModelConfig) -> dict:
    out = hf_llama.params_to_hf(params, dataclasses.replace(c, tie_embeddings=True))
    out["score.weight"] = params[HEAD]["kernel"].T
    return out


CONVERTER = register(Converter(
    architectures=tuple(ARCHITECTURES.values()),
    model_types=(),  # a config.json without architectures is read as a causal LM
    config_class=RewardModelConfig,
    config_from_hf=config_from_hf,
    params_from_hf=params_from_hf,
    config_to_hf=config_to_hf,
    params_to_hf=params_to_hf,
    can_export=lambda cfg: isinstance(cfg, RewardModelConfig) and hf_llama.can_export(cfg),
    ignored_weights=(r"lm_head\.weight",),
))
