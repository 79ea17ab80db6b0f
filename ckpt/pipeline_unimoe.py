"""The `any-to-any` pipeline for Uni-MoE, registered through the checkpoint's `custom_pipelines`.

transformers' `AnyToAnyPipeline` requires torchvision for every model that takes images or video, because its own
video decoding uses it. The Uni-MoE processor decodes images with Pillow and video and audio with PyAV, so that
requirement does not apply to it (and torchvision has no CPU build for the torch 2.13 this project pins). Everything
else is transformers' pipeline unchanged.
"""

from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES
from transformers.pipelines.any_to_any import AnyToAnyPipeline
from transformers.pipelines.base import Pipeline
from transformers.utils.import_utils import requires_backends


class UniMoEAnyToAnyPipeline(AnyToAnyPipeline):
    def __init__(self, *args, **kwargs):
        Pipeline.__init__(self, *args, **kwargs)
        requires_backends(self, "vision")  # Pillow, for images and video frames
        self.check_model_type(MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES)


CUSTOM_PIPELINES = {
    "any-to-any": {
        "impl": "pipeline_unimoe.UniMoEAnyToAnyPipeline",
        "pt": ["AutoModelForMultimodalLM"],
        "type": "multimodal",
    }
}
