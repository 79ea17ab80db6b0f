"""The transformers API names that differ across the releases this package supports (`setup.cfg` gives the range).

Remote code runs on whatever transformers the user has installed, so the model reads and writes these names through
this module instead of hard-coding one release's spelling.

- transformers 5.24 renamed the key-value cache argument and output field from `past_key_values` to `cache` in model
  forwards, `generate`, `create_causal_mask` and every `ModelOutput` (the old name is deprecated until 5.40, and a
  model that reads only the old name silently gets a fresh cache at every decoding step). Our forwards accept both
  names, the new one first, and hand the cache back under the name the running release reads.
"""

import inspect

import transformers
from packaging.version import Version


# The range setup.cfg declares, that CI tests at both ends (`.ci/compat`) and that a published model card states.
MINIMUM_TRANSFORMERS = "5.23"
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

from transformers.cache_utils import Cache  # noqa: E402
from transformers.masking_utils import create_causal_mask  # noqa: E402


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
