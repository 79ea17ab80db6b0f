"""What transformers' common model tests check, for Uni-MoE: save/load round trips (our class, the Auto class, remote
code in a fresh process, a checkpoint with a weight missing), tuple against dict outputs of every public forward,
hidden states / attentions / router logits / media features, eager against sdpa attention on a left-padded batch,
resizing the vocabulary, every generation mode against greedy search, the parallelism plans, and the smaller
contracts (embeddings accessors, `inputs_embeds`, training, activation checkpointing, `_no_split_modules`). Every
check runs twice, for a text-only config and for an all-towers one (CLIP for images and video, Whisper, BEATs),
whose prompts carry media built by the processor.
"""

import inspect
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from itertools import chain

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.cache_utils import Cache, StaticCache
from transformers.integrations.tensor_parallel import replace_layer_number_by_wildcard
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

from modeling_unimoe import UniMoEForCausalLM, UniMoEModel, UniMoETextForCausalLM, UniMoETextModel, modeling_unimoe
from modeling_unimoe.transformers_compat import (
    ACTIVATION_CHECKPOINTING_ENABLE,
    ACTIVATION_CHECKPOINTING_KWARGS,
    CACHE_NAME,
    IS_ACTIVATION_CHECKPOINTING,
)
from tests.utils.media import tone, write_image, write_video
from tests.utils.models import make_tiny_model, make_tiny_text_model
from tests.utils.processes import run_fresh_python
from trl_scripts import load_preset, load_tiny_processor


MEDIA_KEYS = (
    "pixel_values", "pixel_values_videos", "input_features", "input_features_mask", "input_values", "input_values_mask"
)
MEDIA_OUTPUTS = ("image_hidden_states", "video_hidden_states", "audio_hidden_states")
GENERATE = dict(max_new_tokens=5, min_new_tokens=5)

def placeholder_ids(config) -> list[int]:
    """The config's <image>, <video> and <audio> placeholder ids (a text-only config names none)."""
    ids = (getattr(config, f"{modality}_token_id", None) for modality in ("image", "video", "audio"))
    return [i for i in ids if i is not None]


TINY_PLACEHOLDERS = placeholder_ids(load_preset("tiny"))


@dataclass
class Case:
    """One config: a shared model (eval mode; tests that change a model build their own with `fresh`), one prompt,
    and a left-padded batch of two prompts of different lengths, whose rows are also kept alone."""

    name: str
    model: UniMoEForCausalLM
    prompt: dict
    rows: list[dict]
    batch: dict

    @property
    def text_only(self) -> bool:
        return self.name in ("text-only", "text-only layout")

    @property
    def flat(self) -> bool:
        return self.name == "text-only layout"

    @property
    def base_class(self) -> type:
        return UniMoETextModel if self.flat else UniMoEModel

    @property
    def language_model_prefix(self) -> str:
        return "model." if self.flat else "model.language_model."

    def fresh(self, **text_overrides) -> UniMoEForCausalLM | UniMoETextForCausalLM:
        if self.flat:
            return make_tiny_text_model(**text_overrides)
        return make_tiny_model(text_only=self.text_only, **text_overrides)


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def conversations(media_dir, text_only: bool) -> tuple[list, list[list]]:
    """The user turn of the single prompt and of the two batch rows."""
    if text_only:
        return [text("Name a colour.")], [[text("What is the capital of France?")], [text("Hi")]]
    image = {"type": "image", "path": str(write_image(media_dir / "red.png"))}
    video = {"type": "video", "path": str(write_video(media_dir / "moving.mp4"))}
    prompt = [image, video, {"type": "audio", "audio": tone(2.0)}, text("Describe all of it.")]
    return prompt, [[image, video, text("What moves?")], [{"type": "audio", "audio": tone(3.0, 330.0)}, text("Hi")]]


def encode(processor, content: list) -> dict:
    messages = [{"role": "user", "content": content}]
    return dict(processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True))


def left_pad(rows: list[dict], pad_token_id: int) -> dict:
    """The rows as one batch: ids left-padded, each medium's items concatenated in row order (as the processor does)."""
    width = max(row["input_ids"].shape[1] for row in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_token_id),
        "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
    }
    for index, row in enumerate(rows):
        length = row["input_ids"].shape[1]
        batch["input_ids"][index, width - length :] = row["input_ids"][0]
        batch["attention_mask"][index, width - length :] = row["attention_mask"][0]
    for key in MEDIA_KEYS:
        items = [row[key] for row in rows if key in row]
        if items:
            batch[key] = torch.cat(items)
    return batch


@pytest.fixture(scope="module", params=["text-only", "text-only layout", "all-towers"])
def case(request, tmp_path_factory) -> Case:
    """`text-only`: `UniMoEForCausalLM` without towers; `text-only layout`: `UniMoETextForCausalLM`, the flat
    text-only checkpoint layout; `all-towers`: every tower."""
    text_only = request.param != "all-towers"
    processor = load_tiny_processor()
    prompt, row_contents = conversations(tmp_path_factory.mktemp("media"), text_only)
    model = make_tiny_text_model() if request.param == "text-only layout" else make_tiny_model(text_only=text_only)
    rows = [encode(processor, content) for content in row_contents]
    batch = left_pad(rows, model.config.get_text_config().pad_token_id)
    assert (batch["attention_mask"] == 0).any(), "the batch rows must differ in length"
    return Case(request.param, model, encode(processor, prompt), rows, batch)


def media_of(inputs: dict) -> dict:
    return {key: inputs[key] for key in MEDIA_KEYS if key in inputs}


def logits_of(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def new_tokens(sequences: torch.Tensor, inputs: dict) -> torch.Tensor:
    return sequences[:, inputs["input_ids"].shape[1] :]


def labels_of(inputs: dict) -> torch.Tensor:
    return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)


# ---- save / load ---------------------------------------------------------------------------------------------------


def assert_no_loading_problems(info: dict):
    problems = {name: sorted(info[name]) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert problems == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}


def assert_same_state_dict(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("loader", ["own class", "AutoModelForCausalLM"])
def test_save_and_reload_keeps_every_weight_and_the_logits(case, tmp_path, loader):
    case.model.save_pretrained(tmp_path)
    cls = AutoModelForCausalLM if loader == "AutoModelForCausalLM" else type(case.model)
    reloaded, info = cls.from_pretrained(tmp_path, trust_remote_code=True, output_loading_info=True)
    # With the package installed, its registered classes serve `trust_remote_code=True` too (see the fresh-process test).
    assert type(reloaded) is type(case.model) and not reloaded.training
    assert_no_loading_problems(info)
    assert_same_state_dict(reloaded.state_dict(), case.model.state_dict())
    # Bit-identical weights; the logits only to float rounding: memory-mapped safetensors sit at other alignments,
    # which changes the CPU kernels' summation order.
    torch.testing.assert_close(logits_of(reloaded, case.batch), logits_of(case.model, case.batch), atol=1e-5, rtol=0)


def test_remote_code_in_a_fresh_process_reloads_the_same_weights_and_logits(case, tmp_path):
    checkpoint, result = tmp_path / "checkpoint", tmp_path / "result.pt"
    case.model.save_pretrained(checkpoint)
    torch.save(case.batch, tmp_path / "batch.pt")
    run_fresh_python(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model, info = AutoModelForCausalLM.from_pretrained(
            {str(checkpoint)!r}, trust_remote_code=True, output_loading_info=True
        )
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            logits = model(**torch.load({str(tmp_path / "batch.pt")!r})).logits
        info = {{name: sorted(map(str, keys)) for name, keys in info.items()}}
        torch.save({{"info": info, "state": model.state_dict(), "logits": logits}}, {str(result)!r})
        """,
        tmp_path,
    )
    remote = torch.load(result)
    assert_no_loading_problems(remote["info"])
    assert_same_state_dict(remote["state"], case.model.state_dict())
    torch.testing.assert_close(remote["logits"], logits_of(case.model, case.batch), atol=1e-5, rtol=0)


def test_the_base_model_loads_from_a_causal_lm_checkpoint_and_back(case, tmp_path):
    case.model.save_pretrained(tmp_path / "causal")
    base, info = case.base_class.from_pretrained(tmp_path / "causal", output_loading_info=True)
    assert_no_loading_problems(info)  # the head is left out on purpose, not reported
    assert_same_state_dict(base.state_dict(), case.model.model.state_dict())
    base.save_pretrained(tmp_path / "base")
    # base_model_prefix: the backbone's keys land under `model.`; only the head is new
    head, info = type(case.model).from_pretrained(tmp_path / "base", output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["lm_head.weight"] and not info["unexpected_keys"]
    assert_same_state_dict(head.model.state_dict(), case.model.model.state_dict())


def test_a_checkpoint_missing_a_weight_is_refused_by_name(case, tmp_path):
    case.model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    weights = load_file(path)
    deleted = [case.language_model_prefix + "layers.1.mlp.gate.weight"]
    if not case.text_only:
        deleted.append("model.audio_aligner.query_tokens")
    for name in deleted:
        del weights[name]
    save_file(weights, path, metadata=metadata)
    refusal = rf"missing_keys: {re.escape(', '.join(sorted(deleted)))} \(pass `output_loading_info=True`"
    with pytest.raises(ValueError, match=refusal):
        type(case.model).from_pretrained(tmp_path)
    _, info = type(case.model).from_pretrained(tmp_path, output_loading_info=True)
    assert sorted(info["missing_keys"]) == sorted(deleted)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]


# ---- return_dict -----------------------------------------------------------------------------------------------------


def public_forwards(case: Case) -> dict:
    """Every public forward of the config, as `name -> call(model, **kwargs)`, asked for its optional outputs too."""
    batch, prompt = case.batch, case.prompt
    forwards = {
        "UniMoEForCausalLM": lambda model, **kw: model(**batch, output_hidden_states=True, output_router_logits=True, **kw),
        "UniMoEModel": lambda model, **kw: model.model(**batch, output_hidden_states=True, output_router_logits=True, **kw),
    }
    if not case.text_only:
        getters = {
            "get_image_features": (prompt["pixel_values"],),
            "get_video_features": (prompt["pixel_values_videos"],),
            "get_speech_features": (prompt["input_features"], prompt["input_features_mask"]),
            "get_sound_features": (prompt["input_values"], prompt["input_values_mask"]),
            "get_audio_features": (
                prompt["input_features"], prompt["input_values"], prompt["input_values_mask"], prompt["input_features_mask"]
            ),
        }
        for name, args in getters.items():
            forwards[name] = lambda model, name=name, args=args, **kw: getattr(model.model, name)(
                *args, output_hidden_states=True, **kw
            )
    return forwards


def assert_same_outputs(got, expected, where: str):
    """Element-wise equality of two (nested) outputs: tensors, caches, tuples / lists, plain values."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, expected), where
    elif isinstance(expected, Cache):
        assert type(got) is type(expected) and len(got.layers) == len(expected.layers), where
        for index, (got_layer, expected_layer) in enumerate(zip(got.layers, expected.layers)):
            assert torch.equal(got_layer.keys, expected_layer.keys), f"{where} cache layer {index}"
            assert torch.equal(got_layer.values, expected_layer.values), f"{where} cache layer {index}"
    elif isinstance(expected, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(expected), where
        for index, (got_item, expected_item) in enumerate(zip(got, expected)):
            assert_same_outputs(got_item, expected_item, f"{where}[{index}]")
    else:
        assert got == expected, where


def test_tuple_outputs_equal_the_dict_outputs_of_every_public_forward(case):
    """`return_dict=False` (the argument) or `config.return_dict = False` gives `ModelOutput.to_tuple()`; inside the
    model the sub-calls keep returning dicts, and `generate` keeps working."""
    model = case.fresh()
    greedy = model.generate(**case.prompt, do_sample=False, **GENERATE)
    with torch.no_grad():
        for name, forward in public_forwards(case).items():
            as_dict = forward(model)
            assert isinstance(as_dict, ModelOutput), name
            assert_same_outputs(forward(model, return_dict=False), as_dict.to_tuple(), f"{name}(return_dict=False)")
            model.config.return_dict = False
            try:
                assert_same_outputs(forward(model), as_dict.to_tuple(), f"{name} with config.return_dict=False")
                assert isinstance(forward(model, return_dict=True), ModelOutput), name  # the argument wins
            finally:
                model.config.return_dict = True
    model.config.return_dict = False
    assert torch.equal(model.generate(**case.prompt, do_sample=False, **GENERATE), greedy)


# ---- hidden states, attentions, router logits, media features ------------------------------------------------------


def expected_media_shapes(case: Case) -> dict:
    """The documented media feature shapes for the batch: [items, P, D] images and (mean-pooled) videos,
    [audio windows, towers * Q, D] audio."""
    if case.text_only:
        return {}
    config, batch = case.model.config, case.batch
    hidden = config.get_text_config().hidden_size
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    return {
        "image_hidden_states": (batch["pixel_values"].shape[0], patches, hidden),
        "video_hidden_states": (batch["pixel_values_videos"].shape[0], patches, hidden),
        "audio_hidden_states": (
            batch["input_features"].shape[0], len(config.audio_towers) * config.num_query_tokens, hidden
        ),
    }


def test_hidden_states_router_logits_and_media_features(case):
    config = case.model.config
    text_config = config.get_text_config()
    batch_size, seq_len = case.batch["input_ids"].shape
    with torch.no_grad():
        out = case.model(**case.batch, output_hidden_states=True, output_router_logits=True)
    assert len(out.hidden_states) == text_config.num_hidden_layers + 1
    assert all(state.shape == (batch_size, seq_len, text_config.hidden_size) for state in out.hidden_states)
    assert len(out.router_logits) == len(text_config.sparse_layer_indices)
    assert all(logits.shape == (batch_size * seq_len, text_config.num_experts) for logits in out.router_logits)
    expected = expected_media_shapes(case)
    for name in MEDIA_OUTPUTS:
        value = getattr(out, name)
        assert (value is None) if name not in expected else (value.shape == expected[name]), name
    # the first hidden state is the embeddings, the media features at their placeholders
    with torch.no_grad():
        embeddings = case.model.get_input_embeddings()(case.batch["input_ids"])
    placeholders = {f"{modality}_hidden_states": getattr(config, f"{modality}_token_id", None) for modality in ("image", "video", "audio")}
    text_positions = torch.ones_like(case.batch["input_ids"], dtype=torch.bool)
    for name in expected:
        positions = case.batch["input_ids"] == placeholders[name]
        text_positions &= ~positions
        torch.testing.assert_close(out.hidden_states[0][positions], getattr(out, name).flatten(0, 1), atol=0, rtol=0)
    torch.testing.assert_close(out.hidden_states[0][text_positions], embeddings[text_positions], atol=0, rtol=0)


def test_eager_attention_returns_one_causal_padding_aware_map_per_layer(case):
    model = case.fresh()
    model.set_attn_implementation("eager")  # sdpa computes no attention weights to return
    text_config = model.config.get_text_config()
    batch_size, seq_len = case.batch["input_ids"].shape
    with torch.no_grad():
        attentions = model(**case.batch, output_attentions=True).attentions
    assert len(attentions) == text_config.num_hidden_layers
    # which keys each real query may see: itself, earlier positions, no padding
    allowed = torch.ones(seq_len, seq_len).tril().bool()[None] & case.batch["attention_mask"].bool()[:, None, :]
    real_queries = case.batch["attention_mask"].bool()
    for layer, weights in enumerate(attentions):
        assert weights.shape == (batch_size, text_config.num_attention_heads, seq_len, seq_len), layer
        weights = weights.permute(0, 2, 1, 3)[real_queries]  # [real queries, heads, keys]
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]), msg=f"layer {layer}")
        forbidden = ~allowed[real_queries][:, None, :].expand_as(weights)
        assert not weights[forbidden].any(), f"layer {layer} attends to the future or to padding"


def test_eager_and_sdpa_attention_agree_on_a_left_padded_batch(case):
    model = case.fresh()
    assert model.config.get_text_config()._attn_implementation == "sdpa"  # the default, as `_supports_sdpa` promises
    sdpa = logits_of(model, case.batch)
    model.set_attn_implementation("eager")
    towers = [getattr(model.config, name, None) for name in ("vision_config", "speech_config")]
    configs = [model.config.get_text_config()] + [config for config in towers if config]
    assert all(config._attn_implementation == "eager" for config in configs)
    eager = logits_of(model, case.batch)
    real = case.batch["attention_mask"].bool()
    torch.testing.assert_close(eager[real], sdpa[real], atol=1e-5, rtol=0)


def test_left_padding_leaves_every_rows_logits_unchanged(case):
    padded = logits_of(case.model, case.batch)
    for index, row in enumerate(case.rows):
        length = row["input_ids"].shape[1]
        alone = logits_of(case.model, row)[0]
        torch.testing.assert_close(padded[index, -length:], alone, atol=1e-5, rtol=0, msg=f"row {index}")


# ---- resize_token_embeddings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_resize_token_embeddings_grows_and_shrinks_the_vocabulary(case, tied):
    model = case.fresh(tie_word_embeddings=tied)
    original_size = model.config.get_text_config().vocab_size
    original_input = model.get_input_embeddings().weight.detach().clone()
    original_output = model.lm_head.weight.detach().clone()
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    kept = original_size
    for new_size, multiple in ((600, None), (500, None), (513, 64)):
        expected = new_size if multiple is None else math.ceil(new_size / multiple) * multiple
        embeddings = model.resize_token_embeddings(new_size, pad_to_multiple_of=multiple)
        kept = min(kept, expected)
        assert embeddings is model.get_input_embeddings() and embeddings.weight.shape[0] == expected
        assert model.config.get_text_config().vocab_size == expected
        head = model.get_output_embeddings()
        assert head is model.lm_head and head.weight.shape[0] == expected
        assert (head.weight is embeddings.weight) == tied
        assert torch.equal(embeddings.weight[:kept], original_input[:kept])
        assert torch.equal(head.weight[:kept], (original_input if tied else original_output)[:kept])
        ids = case.prompt["input_ids"].clamp(max=expected - 1)  # a shrunk vocabulary lost the prompt's largest ids
        with torch.no_grad():
            out = model(**{**case.prompt, "input_ids": ids}, labels=ids)
            assert out.logits.shape[-1] == expected and torch.isfinite(out.loss)
            assert model(torch.tensor([[expected - 1]])).logits.shape == (1, 1, expected)  # the last new id is usable


# ---- generation ----------------------------------------------------------------------------------------------------


def test_greedy_search_equals_an_argmax_loop_over_full_forwards(case):
    model, prompt = case.model, case.prompt
    generated = model.generate(**prompt, do_sample=False, **GENERATE)
    placeholders = placeholder_ids(model.config)
    sequence = prompt["input_ids"]
    with torch.no_grad():
        for _ in range(GENERATE["max_new_tokens"]):
            # each step re-encodes the whole sequence, media included
            logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence), **media_of(prompt)).logits[:, -1]
            logits[:, placeholders] = -float("inf")  # placeholders are never generated (next test)
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, sequence)


def test_media_placeholders_are_never_generated(case):
    """A config with towers never emits its placeholder ids, however strongly favoured; a text-only config has none,
    so the same ids are ordinary tokens there."""
    bias = {(token_id,): 100.0 for token_id in TINY_PLACEHOLDERS}
    favoured = case.model.generate(**case.prompt, do_sample=False, sequence_bias=bias, **GENERATE)
    emitted = set(new_tokens(favoured, case.prompt).flatten().tolist())
    if case.text_only:
        assert emitted <= set(TINY_PLACEHOLDERS)
    else:
        assert not emitted & set(TINY_PLACEHOLDERS)
        assert torch.equal(favoured, case.model.generate(**case.prompt, do_sample=False, **GENERATE))
    assert case.model.generation_config.suppress_tokens is None  # derived per call, not written into the checkpoint


def sample(model, inputs: dict, seed: int, **kwargs) -> torch.Tensor:
    torch.manual_seed(seed)
    return model.generate(**inputs, do_sample=True, top_k=0, **GENERATE, **kwargs)


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed(case):
    first = sample(case.model, case.prompt, seed=0)
    assert torch.equal(sample(case.model, case.prompt, seed=0), first)
    others = [sample(case.model, case.prompt, seed=seed) for seed in (1, 2, 3)]
    assert any(not torch.equal(other, first) for other in others), "sampling ignores the random state"


def test_two_sampled_sequences_with_top_k_one_are_greedy_search_twice(case):
    greedy = case.model.generate(**case.prompt, do_sample=False, **GENERATE)
    twice = case.model.generate(**case.prompt, do_sample=True, top_k=1, num_return_sequences=2, **GENERATE)
    assert torch.equal(twice, greedy.expand(2, -1))


def test_beam_search_on_a_left_padded_batch_equals_each_row_alone(case):
    kwargs = dict(num_beams=2, do_sample=False, **GENERATE)
    together = new_tokens(case.model.generate(**case.batch, **kwargs), case.batch)
    for index, row in enumerate(case.rows):
        alone = new_tokens(case.model.generate(**row, **kwargs), row)
        assert torch.equal(together[index], alone[0]), f"row {index} differs inside the batch"


def test_beam_search_returns_its_best_beams_first(case):
    kwargs = dict(num_beams=2, do_sample=False, **GENERATE)
    out = case.model.generate(
        **case.prompt, num_return_sequences=2, return_dict_in_generate=True, output_scores=True, **kwargs
    )
    assert out.sequences.shape == (2, case.prompt["input_ids"].shape[1] + GENERATE["max_new_tokens"])
    assert not torch.equal(out.sequences[0], out.sequences[1])
    assert out.sequences_scores[0] >= out.sequences_scores[1]
    assert torch.equal(out.sequences[:1], case.model.generate(**case.prompt, **kwargs))


def test_static_cache_dynamic_cache_and_no_cache_generate_the_same_tokens(case):
    kwargs = dict(do_sample=False, return_dict_in_generate=True, **GENERATE)
    dynamic = case.model.generate(**case.prompt, **kwargs)
    static = case.model.generate(**case.prompt, cache_implementation="static", **kwargs)
    uncached = case.model.generate(**case.prompt, use_cache=False, **kwargs)
    assert isinstance(getattr(static, CACHE_NAME), StaticCache)
    assert not isinstance(getattr(dynamic, CACHE_NAME), StaticCache) and getattr(uncached, CACHE_NAME) is None
    assert torch.equal(static.sequences, dynamic.sequences) and torch.equal(uncached.sequences, dynamic.sequences)


@pytest.mark.parametrize("assistant", ["prompt_lookup", "draft_model"])
def test_assisted_decoding_equals_greedy_search(case, assistant):
    """Prompt lookup copies candidates from the prompt, whose placeholders it must not propose; a draft model (a
    smaller Uni-MoE with the same towers) proposes its own. Either way the output is the greedy one."""
    if assistant == "prompt_lookup":
        kwargs = dict(prompt_lookup_num_tokens=3)
    else:
        kwargs = dict(assistant_model=make_tiny_model(seed=7, text_only=case.text_only, num_hidden_layers=1))
    fed = []
    handle = case.model.get_decoder().register_forward_hook(
        # the nested model feeds its language model embeddings, the flat one its ids
        lambda _, __, kwargs_, ___: fed.append(next(kwargs_[name] for name in ("inputs_embeds", "input_ids") if kwargs_.get(name) is not None).shape[1]),
        with_kwargs=True,
    )
    try:
        assisted = case.model.generate(**case.prompt, do_sample=False, **kwargs, **GENERATE)
    finally:
        handle.remove()
    prompt_length = case.prompt["input_ids"].shape[1]
    assert fed[0] > prompt_length or any(length > 1 for length in fed[1:]), "no candidate was ever verified"
    assert torch.equal(assisted, case.model.generate(**case.prompt, do_sample=False, **GENERATE))


# ---- parallelism plans ---------------------------------------------------------------------------------------------


def wildcard_names(module: nn.Module) -> set[str]:
    """Module and parameter names with layer indices as `*`, the way transformers matches plan keys."""
    return {replace_layer_number_by_wildcard(name) for name, _ in chain(module.named_modules(), module.named_parameters())}


def test_parallelism_plans_name_real_modules_and_parameters(case):
    # dense, sparse and shared-expert feed-forwards side by side, so that every rule of the plans has something to match
    model = case.fresh(moe_layers="odd", num_shared_experts=1)
    names = wildcard_names(model)
    assert model.tp_plan and model.ep_plan and model.pp_plan
    for plan_name in ("tp_plan", "ep_plan"):
        plan = getattr(model, plan_name)
        assert sorted(key for key in plan if key not in names) == [], plan_name
    assert all(isinstance(model.get_submodule(key), nn.Module) for key in model.pp_plan)
    # each sub-model's config plans, under that sub-model (the towers declare none; the language model does)
    declared = 0
    for prefix, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and module is not model:
            for plan_name in ("base_model_tp_plan", "base_model_ep_plan", "base_model_pp_plan"):
                for key in getattr(module.config, plan_name, None) or {}:
                    declared += 1
                    assert key in wildcard_names(module), f"{prefix}: {plan_name} {key}"
                    assert f"{prefix}.{key}" in getattr(model, plan_name.removeprefix("base_model_")), f"{prefix}.{key}"
    assert declared >= len(model.config.get_text_config().base_model_tp_plan)


# ---- embeddings, inputs_embeds, determinism, training --------------------------------------------------------------


def test_input_and_output_embeddings_are_the_language_models(case):
    model = case.fresh()
    text_config = model.config.get_text_config()
    embeddings = model.get_input_embeddings()
    assert embeddings is model.model.get_input_embeddings() is model.get_decoder().embed_tokens
    assert isinstance(embeddings, nn.Embedding)
    assert embeddings.weight.shape == (text_config.vocab_size, text_config.hidden_size)
    head = model.get_output_embeddings()
    assert head is model.lm_head and isinstance(head, nn.Linear) and head.out_features == text_config.vocab_size
    before = logits_of(model, case.prompt)
    torch.manual_seed(3)
    replacement = nn.Embedding(text_config.vocab_size, text_config.hidden_size, text_config.pad_token_id)
    model.set_input_embeddings(replacement)
    assert model.get_input_embeddings() is replacement and model.get_decoder().embed_tokens is replacement
    after = logits_of(model, case.prompt)
    assert not torch.allclose(after, before)
    with torch.no_grad():
        embeds = replacement(case.prompt["input_ids"])
        attention_mask = case.prompt["attention_mask"]
        through_embeds = model(inputs_embeds=embeds, attention_mask=attention_mask, **media_of(case.prompt)).logits
    torch.testing.assert_close(through_embeds, after, atol=1e-6, rtol=0)


def test_inputs_embeds_give_the_same_logits_and_generation_as_input_ids(case):
    model, prompt = case.model, case.prompt
    with torch.no_grad():
        embeds = model.get_input_embeddings()(prompt["input_ids"])
        from_embeds = model(inputs_embeds=embeds, attention_mask=prompt["attention_mask"], **media_of(prompt)).logits
        with pytest.raises(ValueError, match="exactly one of `input_ids` or `inputs_embeds`"):
            model(input_ids=prompt["input_ids"], inputs_embeds=embeds)
    torch.testing.assert_close(from_embeds, logits_of(model, prompt), atol=1e-6, rtol=0)
    generated = model.generate(
        inputs_embeds=embeds, attention_mask=prompt["attention_mask"], **media_of(prompt), do_sample=False, **GENERATE
    )
    assert torch.equal(generated, new_tokens(model.generate(**prompt, do_sample=False, **GENERATE), prompt))


def test_forward_without_grad_is_deterministic(case):
    with torch.no_grad():
        first, second = case.model(**case.batch).logits, case.model(**case.batch).logits
    assert not first.requires_grad and torch.equal(first, second)


def test_training_forward_gives_a_scalar_loss_whose_gradients_reach_every_router_and_tower(case):
    model = case.fresh().train()
    out = model(**case.batch, labels=labels_of(case.batch), output_router_logits=True, output_hidden_states=True)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss) and out.loss.requires_grad and out.aux_loss is not None
    out.hidden_states[0].retain_grad()
    out.loss.backward()
    assert out.hidden_states[0].grad is not None and out.hidden_states[0].grad.any()
    routers = {name: p for name, p in model.named_parameters() if name.endswith(".mlp.gate.weight")}
    assert len(routers) == len(model.config.get_text_config().sparse_layer_indices)
    assert all(p.grad is not None and p.grad.any() for p in routers.values()), "a router gets no gradient"
    # towers, aligners, projector, language model; in the flat layout the language model's own parts
    for name, child in model.model.named_children():
        if not any(True for _ in child.parameters()):
            continue  # the rotary embedding has no weights
        assert any(p.grad is not None and p.grad.any() for p in child.parameters()), f"no gradient reaches {name}"


def count_checkpointed_layer_work(model) -> Counter:
    """Per checkpointable layer, the calls of the modules inside it. The backward's recomputation repeats them (up to
    the last activation it needs); transformers checkpoints a layer's `forward`, so hooks on the layer itself fire once."""
    calls = Counter()
    for name, layer in model.named_modules():
        if isinstance(layer, GradientCheckpointingLayer):
            for inner in layer.modules():
                if inner is not layer:
                    inner.register_forward_hook(lambda *_, name=name: calls.update([name]))
    return calls


def loss_and_gradients(model, inputs: dict) -> tuple[torch.Tensor, dict, Counter]:
    calls = count_checkpointed_layer_work(model)
    torch.manual_seed(0)  # the towers' dropout, active in training mode
    out = model(**inputs, labels=labels_of(inputs), output_router_logits=True)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}, calls


# the running release's name and the deprecated one (transformers >= 5.23; one and the same name before)
@pytest.mark.parametrize("entry_point", list(dict.fromkeys([ACTIVATION_CHECKPOINTING_ENABLE, "gradient_checkpointing_enable"])))
def test_activation_checkpointing_gives_the_same_loss_and_gradients(case, entry_point):
    expected_loss, expected, plain_calls = loss_and_gradients(case.fresh().train(), case.batch)
    model = case.fresh().train()
    with warnings.catch_warnings():  # `gradient_checkpointing_enable` is the deprecated name since transformers 5.23
        warnings.simplefilter("ignore", FutureWarning)
        kwargs_name = ACTIVATION_CHECKPOINTING_KWARGS if entry_point == ACTIVATION_CHECKPOINTING_ENABLE else "gradient_checkpointing_kwargs"
        getattr(model, entry_point)(**{kwargs_name: {"use_reentrant": False}})
    assert getattr(model, IS_ACTIVATION_CHECKPOINTING)
    loss, got, calls = loss_and_gradients(model, case.batch)
    assert calls.keys() == plain_calls.keys() and plain_calls
    not_recomputed = sorted(name for name in calls if calls[name] <= plain_calls[name])
    assert not not_recomputed, f"layers not recomputed in the backward: {not_recomputed}"
    torch.testing.assert_close(loss, expected_loss)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


# ---- class contracts -----------------------------------------------------------------------------------------------


def test_class_attributes_hold_for_the_instantiated_model(case):
    model = case.model
    assert model.can_generate() and not model.model.can_generate()
    assert model.base_model_prefix == "model" and getattr(model, model.base_model_prefix) is model.base_model is model.model
    assert isinstance(model.base_model, case.base_class)
    assert model._supports_sdpa and model.config._attn_implementation == "sdpa"
    assert model.main_input_name == "input_ids" and next(iter(inspect.signature(model.forward).parameters)) == "input_ids"


def enclosing_classes(model: nn.Module, name: str) -> set[str]:
    """Class names of the module `name` and of every module around it."""
    parts = name.split(".")
    return {type(model.get_submodule(".".join(parts[:depth]))).__name__ for depth in range(len(parts) + 1)}


def test_no_split_modules_keep_every_unsplittable_unit_whole(case):
    model = case.model
    own = type(model)._no_split_modules
    assert all(issubclass(getattr(modeling_unimoe, name), nn.Module) for name in own)
    units = set(model._no_split_modules)  # what `device_map` keeps whole: ours and the towers'
    assert set(own) <= units
    present = {type(module).__name__ for module in model.modules()}
    assert {"UniMoEDecoderLayer"} <= present & units
    # every module that a transformers model inside ours (a tower, the Q-Former) declares unsplittable sits in a unit
    declared = set().union(*(set(m._no_split_modules or ()) for m in model.modules() if isinstance(m, PreTrainedModel)))
    for name, module in model.named_modules():
        if type(module).__name__ in declared:
            assert enclosing_classes(model, name) & units, f"{name} ({type(module).__name__}) can be split"
