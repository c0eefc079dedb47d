"""Networks (Flax modules) and the model wrappers that train, score and decode them."""

from t5x_like.models.base import (BaseModel, DecoderOnlyModel, EncoderDecoderModel, EncoderOnlyModel,
                                  model_for_config)
from t5x_like.models.config import (ConfigError, DecoderOnlyConfig, EncoderDecoderConfig, EncoderOnlyConfig,
                                    TransformerConfig)
from t5x_like.models.decoder_only import DecoderOnly
from t5x_like.models.encoder_decoder import EncoderDecoder
from t5x_like.models.encoder_only import EncoderOnly
