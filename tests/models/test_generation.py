"""The KV cache is threaded through `generate` on every supported transformers release (see `transformers_compat`).

transformers 5.24 renamed the cache argument (`past_key_values` -> `cache`); a model that reads only one name gets a
fresh cache at every step and decodes from the newest token alone. These tests count what the decoder sees and
compare every cached decoding strategy against the same strategy without a cache, text-only and with media.
"""

import logging
import sys
import warnings

import pytest
import torch
from transformers.cache_utils import DynamicCache

from modeling_unimoe.transformers_compat import CACHE_NAME, pop_cache
from tests.utils.media import tone, write_image, write_video
from tests.utils.models import make_tiny_model, random_ids


def media_prompt(processor, tmp_path):
    image = write_image(tmp_path / "red.png")
    return dict(processor(text="<image>\n<audio>\nWhat is it?", images=[image], audio=[tone(1.5)]))


@pytest.fixture(params=["text", "media"])
def model_and_prompt(request, tiny_processor, tmp_path):
    if request.param == "text":
        return make_tiny_model(), {"input_ids": random_ids(1, 6)}
    return make_tiny_model(text_only=False), media_prompt(tiny_processor, tmp_path)


def record_decoder_steps(model):
    """Per language-model call: (batch rows, new positions fed, cache length after the call, cache object)."""
    steps = []

    def hook(module, args, kwargs, output):
        embeds = kwargs["inputs_embeds"]
        cache = getattr(output, CACHE_NAME)
        steps.append((embeds.shape[0], embeds.shape[1], cache.get_seq_length() if cache is not None else None, cache))

    return steps, model.model.language_model.register_forward_hook(hook, with_kwargs=True)


def test_each_decoding_step_feeds_one_token_per_row_and_grows_the_cache(model_and_prompt):
    model, prompt = model_and_prompt
    prompt_length = prompt["input_ids"].shape[1]
    steps, handle = record_decoder_steps(model)
    model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    handle.remove()
    assert [(rows, fed, length) for rows, fed, length, _ in steps] == [(1, prompt_length, prompt_length)] + [
        (1, 1, prompt_length + step) for step in range(1, 5)
    ]
    assert len({id(cache) for *_, cache in steps}) == 1, "every step must extend the same cache"


def test_each_row_of_a_beam_search_gets_one_token_per_step():
    model = make_tiny_model()
    prompt = random_ids(2, 5)
    steps, handle = record_decoder_steps(model)
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, num_beams=3, do_sample=False)
    handle.remove()
    assert [(rows, fed, length) for rows, fed, length, _ in steps] == [(6, 5, 5)] + [(6, 1, 5 + s) for s in range(1, 4)]


def generate_both_ways(model, prompt, **kwargs):
    """The same generate call with and without the KV cache (a sampling call is reseeded for each)."""
    results = []
    for use_cache in (True, False):
        torch.manual_seed(1234)
        results.append(model.generate(**prompt, use_cache=use_cache, max_new_tokens=8, min_new_tokens=8, **kwargs))
    return results


STRATEGIES = {
    "greedy": dict(do_sample=False),
    "beam_search": dict(do_sample=False, num_beams=3),
    "seeded_sampling": dict(do_sample=True, top_k=0, top_p=1.0),
    "two_return_sequences": dict(do_sample=True, top_k=0, num_return_sequences=2),
    "beams_returning_two": dict(do_sample=False, num_beams=3, num_return_sequences=2),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cached_generation_equals_uncached(model_and_prompt, strategy):
    model, prompt = model_and_prompt
    cached, uncached = generate_both_ways(model, prompt, **STRATEGIES[strategy])
    expected_rows = STRATEGIES[strategy].get("num_return_sequences", 1)
    assert cached.shape == (expected_rows, prompt["input_ids"].shape[1] + 8)
    assert torch.equal(cached, uncached)


def test_static_cache_equals_uncached(model_and_prompt):
    model, prompt = model_and_prompt
    static = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, cache_implementation="static")
    uncached = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(static, uncached)


@pytest.mark.parametrize("experts", ["eager", "grouped_mm"])
def test_compiled_static_cache_decoding_equals_eager(experts):
    """`generate` with a static cache compiles the decoding step with `fullgraph=True` (a graph break is an error):
    the eager experts, whose grouping reads expert counts on the host, run as transformers' batched experts there."""
    from transformers.generation.configuration_utils import CompileConfig

    model = make_tiny_model()
    model.set_experts_implementation(experts)
    prompt = {"input_ids": random_ids(1, 6)}
    expected = model.generate(**prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only unless told so
    torch._dynamo.reset()
    compiled = model.generate(
        **prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, cache_implementation="static",
        compile_config=compile_config,
    )
    assert torch.equal(compiled, expected)
    assert model._compiled_call is not None  # the step did run compiled


def test_assisted_decoding_with_a_draft_model_equals_uncached():
    model = make_tiny_model()
    draft = make_tiny_model(seed=7, num_hidden_layers=1)  # a different, smaller model proposes the tokens
    prompt = {"input_ids": random_ids(1, 6)}
    assisted = model.generate(**prompt, assistant_model=draft, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    uncached = model.generate(**prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(assisted, uncached)


def test_generation_continues_from_a_returned_cache(model_and_prompt):
    model, prompt = model_and_prompt
    kwargs = dict(do_sample=False, return_dict_in_generate=True)
    first = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, **kwargs)
    cache = getattr(first, CACHE_NAME)
    assert cache.get_seq_length() == first.sequences.shape[1] - 1  # the last token has not been fed yet
    # The continuation gets the whole sequence and the cache: only the uncached tail is fed, media already sits in it.
    attention_mask = torch.ones_like(first.sequences)
    continued = model.generate(
        input_ids=first.sequences, attention_mask=attention_mask, max_new_tokens=4, min_new_tokens=4,
        **{CACHE_NAME: cache}, **kwargs,
    )
    whole = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(continued.sequences, whole)


def test_forward_accepts_the_cache_under_either_name(tiny_model):
    """Callers written for transformers < 5.24 pass `past_key_values`, newer ones `cache`: both extend the cache."""
    ids = random_ids(1, 7)
    with torch.no_grad():
        full = tiny_model(ids).logits[:, -1]
        for name in ("cache", "past_key_values"):
            prefix = tiny_model(ids[:, :-1], use_cache=True)
            cache = getattr(prefix, CACHE_NAME)
            step = tiny_model(ids[:, -1:], use_cache=True, **{name: cache})
            assert getattr(step, CACHE_NAME) is cache and cache.get_seq_length() == 7, name
            torch.testing.assert_close(step.logits[:, -1], full, atol=1e-5, rtol=0)


def test_two_different_caches_are_refused():
    first, second = DynamicCache(), DynamicCache()
    with pytest.raises(ValueError, match=rf"two different caches.*pass one, as `{CACHE_NAME}`"):
        pop_cache(first, {"past_key_values": second})
    same = {"past_key_values": first}
    assert pop_cache(first, same) is first and same == {}
    assert pop_cache(None, {}) is None


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_legacy_tuple_cache_is_refused_by_name(tiny_model, name):
    ids = random_ids(1, 5)
    with torch.no_grad():
        legacy = tuple((key, value) for key, value in zip(*[[torch.zeros(1, 2, 4, 16)] * 4] * 2))
        with pytest.raises(TypeError, match=r"must be a transformers `Cache` .*got tuple"):
            tiny_model(ids[:, -1:], **{name: legacy})


def test_no_deprecation_warning_from_our_code(tiny_model):
    """The deprecated cache name never reaches transformers from our code: no `FutureWarning` (deprecated arguments)
    and no deprecation log line (transformers >= 5.24 logs one when an output is built or read under the old name)."""
    from transformers.utils import logging as hf_logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logging.warning_once.cache_clear()  # it logs each message once per process
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # whatever TRANSFORMERS_VERBOSITY says
    hf_logging.get_logger().addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", category=FutureWarning)
            tiny_model.generate(random_ids(1, 4), max_new_tokens=3, do_sample=False)
            tiny_model(random_ids(1, 4), use_cache=True)
    finally:
        hf_logging.get_logger().removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    assert not [record.getMessage() for record in records if "deprecated" in record.getMessage()]


# Media inputs hold one entry per item (image, video, audio window), not per row: `num_return_sequences` and beams
# must repeat each row's own items with it.
def media_prompts(tmp_path):
    blue, red = write_image(tmp_path / "blue.png", color=(0, 0, 255)), write_image(tmp_path / "red.png")
    right, left = write_video(tmp_path / "right.mp4"), write_video(tmp_path / "left.mp4", moving="left")
    return {
        "two_images": ("<image>\n<image>\nWhat?", dict(images=[blue, red])),
        "two_audio_windows": ("<audio>\nWhat?", dict(audio=[tone(6.0)])),  # 4 s windows in the tiny preset
        "two_videos_and_image": ("<video>\n<video>\n<image>\nWhat?", dict(videos=[str(right), str(left)], images=[red])),
    }


@pytest.mark.parametrize("case", ["two_images", "two_audio_windows", "two_videos_and_image"])
def test_every_returned_sequence_sees_its_own_media(tiny_multimodal_model, tiny_processor, tmp_path, case):
    text, media = media_prompts(tmp_path)[case]
    inputs = tiny_processor(text=text, **media)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6)
    greedy = tiny_multimodal_model.generate(**inputs, do_sample=False, **kwargs)
    # top_k=1 sampling is greedy: both returned sequences must equal it
    twice = tiny_multimodal_model.generate(**inputs, do_sample=True, top_k=1, num_return_sequences=2, **kwargs)
    assert torch.equal(twice, greedy.expand(2, -1))


@pytest.mark.parametrize("case", ["two_images", "two_audio_windows", "two_videos_and_image"])
def test_expanded_rows_get_their_items_in_order(tiny_multimodal_model, tiny_processor, tmp_path, case):
    """With 3 sequences per prompt the towers must see the prompt's items 3 times over, each time in prompt order."""
    text, media = media_prompts(tmp_path)[case]
    inputs = tiny_processor(text=text, **media)
    seen = {"vision_tower": [], "speech_tower": []}
    for tower, calls in seen.items():
        getattr(tiny_multimodal_model.model, tower).register_forward_hook(lambda _, args, __, calls=calls: calls.append(args[0]))
    tiny_multimodal_model.generate(**inputs, max_new_tokens=2, do_sample=True, top_k=1, num_return_sequences=3)
    thrice = lambda items: torch.cat([items] * 3)  # noqa: E731
    if case == "two_images":
        assert torch.equal(seen["vision_tower"][0], thrice(inputs["pixel_values"]))
    elif case == "two_audio_windows":
        assert torch.equal(seen["speech_tower"][0], thrice(inputs["input_features"]))
    else:
        image_call, video_call = seen["vision_tower"]
        assert torch.equal(image_call, thrice(inputs["pixel_values"]))
        assert torch.equal(video_call, thrice(inputs["pixel_values_videos"]).flatten(0, 1))


def test_beam_search_on_a_mixed_batch_equals_each_prompt_alone(tiny_multimodal_model, tiny_processor, tmp_path):
    prompts = media_prompts(tmp_path)
    texts = [prompts["two_images"][0], prompts["two_audio_windows"][0]]
    batch = tiny_processor(text=texts, images=[prompts["two_images"][1]["images"], []], audio=[[], [tone(6.0)]], padding=True)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=2)
    seen = {"vision_tower": [], "speech_tower": []}
    handles = [
        getattr(tiny_multimodal_model.model, tower).register_forward_hook(lambda _, args, __, calls=calls: calls.append(args[0]))
        for tower, calls in seen.items()
    ]
    together = tiny_multimodal_model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1]:]
    for handle in handles:
        handle.remove()
    # both beams of row 0 see its two images in order, both beams of row 1 its two audio windows
    assert torch.equal(seen["vision_tower"][0], torch.cat([batch["pixel_values"]] * 2))
    assert torch.equal(seen["speech_tower"][0], torch.cat([batch["input_features"]] * 2))
    for row, name in enumerate(("two_images", "two_audio_windows")):
        text, media = prompts[name]
        single = tiny_processor(text=text, **media)
        alone = tiny_multimodal_model.generate(**single, **kwargs)[0, single["input_ids"].shape[1]:]
        assert torch.equal(together[row], alone), f"prompt {row} ({name}) differs inside the batch"


def test_media_that_does_not_split_over_the_rows_is_named(tiny_multimodal_model, tiny_processor, tmp_path):
    inputs = tiny_processor(text="<image>\nWhat?", images=[write_image(tmp_path / "red.png")])
    inputs["pixel_values"] = inputs["pixel_values"].repeat(3, 1, 1, 1)  # three images for one placeholder block
    split = r"image: the batch has \d+ image placeholder tokens \(\[\d+\] per row\), which do not split into its 3 image"
    with pytest.raises(ValueError, match=split):
        tiny_multimodal_model.generate(**inputs, max_new_tokens=2, num_beams=2)


def test_generating_past_max_position_embeddings_warns_once():
    """The context length lives in `text_config`; the composite config exposes it as `config.max_position_embeddings`,
    where transformers' generation reads it: its `MaxLengthCriteria` warns (once) past it, as for a LLaMA, and the
    default `max_length` stops there."""
    limit = 29  # an unusual value: transformers' warning_once remembers each message for the whole process
    model = make_tiny_model(max_position_embeddings=limit)
    assert model.config.max_position_embeddings == model.config.text_config.max_position_embeddings == limit
    reminder = f"exceeded the model's predefined maximum length ({limit})"
    # a handler of our own on transformers' logger: caplog's root handler would also see the record whenever another
    # test has turned on transformers' propagation, and count it twice
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        model.generate(random_ids(1, 10), max_new_tokens=limit - 10, min_new_tokens=limit - 10, do_sample=False)
        assert not [r for r in records if reminder in r.getMessage()]  # up to the limit: silent
        for _ in range(2):
            out = model.generate(random_ids(1, 20), max_new_tokens=15, min_new_tokens=15, do_sample=False)
            assert out.shape[1] == 35  # it warns, it does not cut what was asked for
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' advice to set max_new_tokens
            default = model.generate(random_ids(1, 20), do_sample=False, min_new_tokens=limit - 20)
    finally:
        transformers_logger.removeHandler(handler)
    assert len([r for r in records if reminder in r.getMessage()]) == 1
    assert default.shape[1] == limit  # the default max_length (prompt + 20) is capped at the context length


def placeholder_only_prompt(processor, tmp_path, modality: str) -> dict:
    """A chat prompt with one `modality` item, encoded by the processor, then stripped of its media inputs."""
    item = {
        "image": {"type": "image", "path": str(write_image(tmp_path / "red.png"))},
        "video": {"type": "video", "path": str(write_video(tmp_path / "move.mp4"))},
        "audio": {"type": "audio", "audio": tone(1.5)},
    }[modality]
    messages = [{"role": "user", "content": [item, {"type": "text", "text": "What is it?"}]}]
    encoded = processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_placeholders_without_their_media_are_refused(tiny_multimodal_model, tiny_processor, tmp_path, modality):
    """Before, the placeholders ran as plain text: the answer ignored the media the prompt claims to hold."""
    prompt = placeholder_only_prompt(tiny_processor, tmp_path, modality)
    missing = rf"{modality}: the batch has \d+ {modality} placeholder tokens but 0 feature vectors"
    with pytest.raises(ValueError, match=missing):
        tiny_multimodal_model(**prompt)
    for use_cache in (True, False):
        with pytest.raises(ValueError, match=missing):
            tiny_multimodal_model.generate(**prompt, use_cache=use_cache, max_new_tokens=2)


def test_placeholders_of_a_medium_left_out_of_a_mixed_prompt_are_refused(tiny_multimodal_model, tiny_processor, tmp_path):
    inputs = media_prompt(tiny_processor, tmp_path)  # an image and an audio clip
    for name in ("input_features", "input_features_mask", "input_values", "input_values_mask"):
        inputs.pop(name, None)
    with pytest.raises(ValueError, match=r"audio: the batch has \d+ audio placeholder tokens but 0 feature vectors"):
        tiny_multimodal_model(**inputs)


def test_token_ids_are_checked_at_prefill_only(model_and_prompt, monkeypatch):
    """The id check (vocabulary range, placeholders without media) reads a device tensor back, a host sync: a cached
    generate does it once, for the prompt, and not at the decoding steps, which feed one sampled token each."""
    import modeling_unimoe.modeling_unimoe as modeling

    model, prompt = model_and_prompt
    checked, check = [], modeling._check_token_ids
    tolist = torch.Tensor.tolist

    def counting_tolist(tensor):
        if sys._getframe(1).f_code is check.__code__:
            checked.append(1)
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert len(checked) == 1


@pytest.mark.parametrize("draft_text_only", [True, False])
def test_a_draft_model_on_a_media_prompt_still_drafts(tiny_multimodal_model, tiny_processor, tmp_path, draft_text_only):
    """transformers withholds the media from an assistant's prefill on purpose: the draft must still run (its prompt
    goes in as embeddings, placeholders as text) rather than hit the missing-media check, and the output stays greedy."""
    prompt = media_prompt(tiny_processor, tmp_path)
    draft = make_tiny_model(seed=7, text_only=draft_text_only, num_hidden_layers=1)
    kwargs = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6)
    assisted = tiny_multimodal_model.generate(**prompt, assistant_model=draft, **kwargs)
    assert torch.equal(assisted, tiny_multimodal_model.generate(**prompt, **kwargs))
