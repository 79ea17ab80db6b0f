"""Uni-MoE for transformers: the configuration and model classes, registered with the Auto factories.

Checkpoints saved by these classes carry the same files as remote code (`trust_remote_code=True`), so Hub users do
not need this package; installing it registers the classes for users who do.
"""

# First: it refuses a transformers older than the supported range before the imports below need newer names.
from .transformers_compat import SUPPORTED_TRANSFORMERS  # isort: skip

from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForCausalLM, AutoProcessor

from .configuration_beats import BEATsConfig
from .configuration_unimoe import UniMoEConfig, UniMoETextConfig
from .feature_extraction_unimoe import UniMoEFeatureExtractor
from .modeling_beats import BEATsModel, load_beats_checkpoint
from .modeling_unimoe import (
    UniMoECausalLMOutputWithPast,
    UniMoEExperts,
    UniMoEForCausalLM,
    UniMoEModel,
    UniMoEMoeSpec,
    UniMoEMultimodalSparseMoeBlock,
    UniMoEPreTrainedModel,
    UniMoESparseMoeBlock,
    UniMoETextForCausalLM,
    UniMoETextModel,
    UniMoETopKRouter,
    router_balance_loss,
    router_z_loss,
)
from .processing_unimoe import UniMoEProcessor
from .quantization_unimoe import UniMoEInt8Config, quantize_language_model


AutoConfig.register(BEATsConfig.model_type, BEATsConfig, exist_ok=True)
AutoConfig.register(UniMoEConfig.model_type, UniMoEConfig, exist_ok=True)
AutoConfig.register(UniMoETextConfig.model_type, UniMoETextConfig, exist_ok=True)
AutoModel.register(BEATsConfig, BEATsModel, exist_ok=True)
AutoModel.register(UniMoEConfig, UniMoEModel, exist_ok=True)
AutoModel.register(UniMoETextConfig, UniMoETextModel, exist_ok=True)
AutoModelForCausalLM.register(UniMoEConfig, UniMoEForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(UniMoETextConfig, UniMoETextForCausalLM, exist_ok=True)
AutoFeatureExtractor.register(UniMoEConfig, UniMoEFeatureExtractor, exist_ok=True)
AutoProcessor.register(UniMoEConfig, UniMoEProcessor, exist_ok=True)

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "BEATsConfig",
    "BEATsModel",
    "UniMoECausalLMOutputWithPast",
    "UniMoEConfig",
    "UniMoEExperts",
    "UniMoEFeatureExtractor",
    "UniMoEForCausalLM",
    "UniMoEInt8Config",
    "UniMoEModel",
    "UniMoEMoeSpec",
    "UniMoEMultimodalSparseMoeBlock",
    "UniMoEPreTrainedModel",
    "UniMoEProcessor",
    "UniMoESparseMoeBlock",
    "UniMoETextConfig",
    "UniMoETextForCausalLM",
    "UniMoETextModel",
    "UniMoETopKRouter",
    "load_beats_checkpoint",
    "quantize_language_model",
    "router_balance_loss",
    "router_z_loss",
]
