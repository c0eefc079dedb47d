"""Model families: networks (Flax modules) and the models that own their loss inputs, scoring,
decoding and FLOPs (the contract in models/base.py), registered by config class (models/registry.py)."""

from t5x_like.models.base import BaseModel, DecodeStart, ModelCapabilityError
from t5x_like.models.config import (ConfigError, DecoderOnlyConfig, EncoderDecoderConfig, EncoderOnlyConfig,
                                    TransformerConfig)
from t5x_like.models.decoder_only import DecoderOnly, DecoderOnlyModel
from t5x_like.models.encoder_decoder import EncoderDecoder, EncoderDecoderModel
from t5x_like.models.encoder_only import EncoderOnly, EncoderOnlyModel
from t5x_like.models.encoder_classifier import (ClassificationFeatureConverter, EncoderClassifier,
                                                 EncoderClassifierConfig, EncoderClassifierModel)
from t5x_like.models.reward_model import RewardModel, RewardModelConfig, RewardNetwork
from t5x_like.models.registry import model_for_config, register, registered_families
