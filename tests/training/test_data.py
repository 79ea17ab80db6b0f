"""Conversation format, validation, collator and the modality-grouped sampler."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from tests.utils.media import write_audio, write_image, write_video
from trl_scripts.training.data import (
    ModalityGroupedSampler,
    UniMoEDataCollator,
    load_conversations,
    modality_mix,
    to_messages,
    validate_dataset,
    with_system_prompt,
)


def write_rows(folder, rows):
    path = folder / "data.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


def llava_rows(root):
    write_image(root / "red.png")
    write_video(root / "move.mp4")
    write_audio(root / "beep.wav")
    return [
        {"id": "img-1", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]},
        {"id": "mix-1", "video": "move.mp4", "voice": ["beep.wav"], "conversations": [
            {"from": "human", "value": "<video>\n<audio>\nWhat happens?"}, {"from": "gpt", "value": "it moves"},
            {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "nothing"}]},
        {"id": "txt-1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "hf-1", "messages": [
            {"role": "user", "content": [{"type": "image", "path": "red.png"}, {"type": "text", "text": "Shape?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "square"}]}]},
    ]


def test_llava_rows_become_chat_messages(tmp_path):
    rows = llava_rows(tmp_path)
    messages = to_messages(rows[1], tmp_path)
    assert messages[0] == {"role": "user", "content": [
        {"type": "video", "path": str(tmp_path / "move.mp4")}, {"type": "audio", "path": str(tmp_path / "beep.wav")},
        {"type": "text", "text": "What happens?"}]}
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert to_messages(rows[3], tmp_path)[0]["content"][0]["path"] == str(tmp_path / "red.png")
    assert [modality_mix(row) for row in rows] == ["image", "audio+video", "text", "image"]


def test_placeholder_and_path_mismatch_names_the_row():
    with pytest.raises(ValueError, match=r"row r7: more <image> placeholders than image paths"):
        to_messages({"id": "r7", "conversations": [{"from": "human", "value": "<image>\n<image>\nx"}], "image": "a.png"})
    with pytest.raises(ValueError, match=r"row r8: media without a placeholder .*audio"):
        to_messages({"id": "r8", "audio": "a.wav", "conversations": [{"from": "human", "value": "x"}]})


def test_loading_and_validation(tmp_path, caplog):
    rows = llava_rows(tmp_path)
    rows.append({"id": "broken-7", "image": "gone.png", "conversations": [
        {"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]})
    (tmp_path / "corrupt.wav").write_bytes(b"RIFFxxxxWAVE")
    rows.append({"id": "broken-8", "audio": "corrupt.wav", "conversations": [
        {"from": "human", "value": "<audio>\nx"}, {"from": "gpt", "value": "y"}]})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    dataset = load_conversations(str(tmp_path / "data.jsonl"))
    assert len(dataset) == 6
    with pytest.raises(ValueError, match=r"row broken-7: image file .*gone\.png.* is missing or unreadable"):
        validate_dataset(dataset, tmp_path)
    with caplog.at_level("WARNING"):
        kept = validate_dataset(dataset, tmp_path, skip_invalid=True)
    assert len(kept) == 4 and "Dropped 2 invalid row(s) of 6" in caplog.text and "broken-8" in caplog.text


def test_collator_builds_a_padded_batch_with_assistant_labels(tmp_path, tiny_processor):
    rows = llava_rows(tmp_path)
    batch = UniMoEDataCollator(tiny_processor, tmp_path)(rows)
    assert batch["input_ids"].shape == batch["labels"].shape
    assert {"pixel_values", "pixel_values_videos", "input_features", "input_values"} <= set(batch)
    tokenizer = tiny_processor.tokenizer
    answers = [tokenizer.decode(ids[labels != -100]).replace(" ", "") for ids, labels in zip(batch["input_ids"], batch["labels"])]
    assert answers == ["red</s>", "itmoves</s>nothing</s>", "hello</s>", "square</s>"]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_cached_encodings_give_the_processors_own_batches(tmp_path, tiny_processor, padding_side):
    """`cache_encodings=True`: each row encoded once, batches assembled by `pad_encodings`, equal tensor for tensor
    to encoding the batch (media of every kind, labels, masks), and the processor is not called for a row again."""
    rows = llava_rows(tmp_path)
    tiny_processor.tokenizer.padding_side = padding_side
    plain = UniMoEDataCollator(tiny_processor, tmp_path, system_prompt="")
    cached = UniMoEDataCollator(tiny_processor, tmp_path, system_prompt="", cache_encodings=True)
    calls = []
    encode = cached._encode
    cached._encode = lambda conversations: calls.append(len(conversations)) or encode(conversations)
    cached.cache_rows(rows)
    assert calls == [1, 1, 1, 1]  # one conversation per call, once per row
    for batch_rows in (rows, rows[::-1], [rows[2], rows[0]], rows[1:2]):
        expected, batch = plain(batch_rows), cached(batch_rows)
        assert set(batch) == set(expected)
        for key in expected:
            assert torch.equal(batch[key], expected[key]), key
    assert calls == [1, 1, 1, 1]  # every batch came from the cache
    assert cached([{**rows[2], "id": "txt-2", "conversations": [
        {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "bye"}]}])["input_ids"].shape[0] == 1
    assert calls == [1, 1, 1, 1, 1]  # a new row is encoded once, when it first comes
    with pytest.raises(ValueError, match="cache_rows needs a collator made with cache_encodings=True"):
        plain.cache_rows(rows)


def test_labels_are_exactly_what_generation_must_produce(tmp_path, tiny_processor):
    # "eight" after "ASSISTANT:" is [' ', 'ei', 'ght'] in the tiny vocabulary: a separator space that is never
    # labelled could never be generated, and the answer would be unreachable from the generation prompt.
    write_image(tmp_path / "red.png")
    rows = [
        {"id": answer, "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": answer}]}
        for answer in ("eight", "three", "zero")
    ]
    batch = UniMoEDataCollator(tiny_processor, tmp_path, system_prompt="")(rows)
    tokenizer = tiny_processor.tokenizer
    assert tokenizer.tokenize(" eight")[0] == "Ġ"  # the case this test is about
    for row, ids, labels, mask in zip(rows, batch["input_ids"], batch["labels"], batch["attention_mask"]):
        ids, labels = ids[mask.bool()], labels[mask.bool()]
        prompt = tiny_processor.apply_chat_template(
            [with_system_prompt(to_messages(row, tmp_path)[:1], "")], tokenize=True, return_dict=True, add_generation_prompt=True
        )["input_ids"][0]
        assert ids[: len(prompt)].tolist() == prompt.tolist()
        assert (labels[: len(prompt)] == -100).all()
        assert labels[len(prompt) :].tolist() == ids[len(prompt) :].tolist()
        assert tokenizer.decode(labels[len(prompt) :]) == f" {row['id']}</s>"


def test_sampler_gives_one_modality_mix_per_global_batch():
    mixes = ["image"] * 10 + ["audio"] * 7 + ["video+audio"] * 3 + ["text"] * 5
    lengths = list(range(len(mixes)))
    sampler = ModalityGroupedSampler(mixes, lengths, global_batch_size=4, seed=3)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler) == (3 + 2 + 1 + 2) * 4
        batches = [order[i : i + 4] for i in range(0, len(order), 4)]
        assert all(len({mixes[i] for i in batch}) == 1 for batch in batches)
        assert set(order) == set(range(len(mixes)))  # every row at least once, none dropped
        assert all(lengths[b[0]] >= lengths[b[-1]] for b in batches)  # by length inside a batch
    first, second = (sampler.set_epoch(0), list(sampler))[1], (sampler.set_epoch(1), list(sampler))[1]
    assert first != second
    assert Counter(first).most_common(1)[0][1] <= 2


def test_text_warmup_rows_replace_each_placeholder_by_its_media_caption():
    from trl_scripts.training.data import text_warmup_rows, with_system_prompt

    captions = [
        {"id": "c0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red circle."}]},
        {"id": "c1", "audio": "b.wav", "conversations": [{"from": "human", "value": "<audio>\nDescribe."}, {"from": "gpt", "value": "Two beeps."}]},
    ]
    row = {
        "id": "r0", "modality": "image", "image": "a.png", "audio": "b.wav",
        "conversations": [{"from": "human", "value": "<audio>\n<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}],
    }
    (warm,) = text_warmup_rows([row], captions)
    assert warm == {
        "id": "text-r0", "modality": "image",
        "conversations": [{"from": "human", "value": "Two beeps.\nA red circle.\nWhat colour?"}, {"from": "gpt", "value": "red"}],
    }
    with pytest.raises(ValueError, match=r"row r1: no caption for its media \['c.png'\]"):
        text_warmup_rows([{**row, "id": "r1", "image": "c.png"}], captions)
    messages = [{"role": "user", "content": "hi"}]
    assert with_system_prompt(messages, None) == messages
    assert with_system_prompt(messages, "")[0] == {"role": "system", "content": ""}
    system = [{"role": "system", "content": "kept"}, *messages]
    assert with_system_prompt(system, "") == system


def original_video_row(root, frames=8):
    """A row of the original's samples.json: a video given as its frame images, one `<video>` in the text."""
    (root / "frames").mkdir()
    for index in range(frames):
        write_image(root / f"frames/frame_{index:03d}.jpg", color=(30 * index, 0, 255 - 30 * index), size=(32, 32))
    return {"id": "video-frames-1", "video": [f"frames/frame_{index:03d}.jpg" for index in range(frames)],
            "conversations": [{"from": "human", "value": "<video>\nWhat happens in the video?"},
                              {"from": "gpt", "value": "the colour changes"}]}  # fmt: skip


def test_a_video_given_as_frame_images_is_one_video_in_training_and_evaluation(tmp_path, tiny_processor):
    from trl_scripts.evaluation.evaluate import load_eval_samples

    row = original_video_row(tmp_path)
    frames = [str(tmp_path / path) for path in row["video"]]
    messages = to_messages(row, tmp_path)
    assert messages[0]["content"] == [{"type": "video", "path": frames}, {"type": "text", "text": "What happens in the video?"}]
    assert modality_mix(row) == "video"
    assert len(validate_dataset(load_conversations(str(write_rows(tmp_path, [row]))), tmp_path)) == 1

    # evaluation reads the same row the same way: the same prompt, the same video tensor
    (tmp_path / "eval.json").write_text(json.dumps([row]))
    sample = load_eval_samples(tmp_path / "eval.json", "vqa", media_root=tmp_path)[0]
    assert sample.messages == messages[:1]
    batch = UniMoEDataCollator(tiny_processor, tmp_path)([row])
    prompt = tiny_processor.apply_chat_template([sample.messages], tokenize=True, return_dict=True, add_generation_prompt=True)
    num_frames = tiny_processor.num_frames
    assert batch["pixel_values_videos"].shape[:2] == prompt["pixel_values_videos"].shape[:2] == (1, num_frames)
    assert torch.equal(batch["pixel_values_videos"], prompt["pixel_values_videos"])
    # the sampled frames are the files', in order: frame i of 8 files for each of the num_frames slots
    direct = tiny_processor(text="<video>", videos=[[frames[i] for i in range(8)]], return_tensors="pt")
    assert torch.equal(direct["pixel_values_videos"], batch["pixel_values_videos"])
    expected = tiny_processor(text="<video>", videos=[[np.asarray(Image.open(path).convert("RGB")) for path in frames]], return_tensors="pt")
    assert torch.equal(expected["pixel_values_videos"], batch["pixel_values_videos"])


def test_a_missing_or_broken_frame_file_is_named(tmp_path, tiny_processor):
    row = original_video_row(tmp_path, frames=4)
    (tmp_path / "frames/frame_002.jpg").unlink()
    dataset = load_conversations(str(write_rows(tmp_path, [row])))
    with pytest.raises(ValueError, match=r"row video-frames-1: video frame file '.*frame_002\.jpg' is missing"):
        validate_dataset(dataset, tmp_path)
    (tmp_path / "frames/frame_002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"video 0: cannot read frame file '.*frame_002\.jpg'"):
        UniMoEDataCollator(tiny_processor, tmp_path)([row])


# validate_dataset catches, before training and naming the row, what would otherwise fail at a training step (issue 14)


def _qa(row_id, question="<audio>\nHow many beeps?", answer="one", **media):
    return {"id": row_id, **media, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def _write_nan_audio(path):
    import soundfile
    from tests.utils.media import tone

    wave = tone(1.0)
    wave[[100, 200]] = [np.nan, np.inf]
    soundfile.write(path, wave, 16000, subtype="FLOAT")  # float WAV: NaN and inf survive decoding
    return path


def _write_nan_image(path):
    pixels = np.full((28, 28), 0.5, dtype=np.float32)
    pixels[3, 3] = np.nan
    Image.fromarray(pixels, mode="F").save(path)  # a 32-bit float TIFF
    return path


def test_audio_over_max_audio_windows_is_refused_before_training(tmp_path, tiny_processor):
    extractor = tiny_processor.feature_extractor
    seconds = extractor.max_audio_windows * extractor.window_seconds + 1  # 17 s: 5 windows of 4 s, 4 allowed
    write_audio(tmp_path / "long.wav", seconds=seconds)
    row = _qa("long-audio", audio="long.wav")
    with pytest.raises(ValueError, match=r"audio item 0 lasts 17\.0 s"):  # what the collator does mid-run, no row id
        UniMoEDataCollator(tiny_processor, tmp_path)([row])
    dataset = load_conversations(str(write_rows(tmp_path, [row])))
    with pytest.raises(ValueError) as error:
        validate_dataset(dataset, tmp_path, processor=tiny_processor)
    assert str(error.value) == (
        f"row long-audio: audio file {str(tmp_path / 'long.wav')!r} lasts 17.0 s (5 windows of 4 s), more than the "
        "model's max_audio_windows=4 (16 s); cut it or drop the row"
    )
    write_audio(tmp_path / "long.wav", seconds=seconds - 1)  # 16 s: exactly 4 windows
    assert len(validate_dataset(dataset, tmp_path, processor=tiny_processor)) == 1


def test_text_over_the_model_maximum_after_media_expansion_is_refused(tmp_path, tiny_processor):
    write_image(tmp_path / "red.png")
    row = _qa("long-text", question="<image>\nWhat colour?", answer="red", image="red.png")
    length = UniMoEDataCollator(tiny_processor, tmp_path)([row])["input_ids"].shape[1]  # the exact training length
    assert length > len(tiny_processor.tokenizer(tiny_processor.apply_chat_template([to_messages(row, tmp_path)], tokenize=False)[0])["input_ids"])
    dataset = load_conversations(str(write_rows(tmp_path, [row])))
    assert len(validate_dataset(dataset, tmp_path, processor=tiny_processor, max_length=length)) == 1
    with pytest.raises(ValueError) as error:
        validate_dataset(dataset, tmp_path, processor=tiny_processor, max_length=length - 1)
    assert str(error.value) == (
        f"row long-text: {length} tokens after expanding its media (1 image, 0 video, 0 audio), more than the model "
        f"maximum of {length - 1} (the model's max_position_embeddings); shorten the conversation or give it fewer media items"
    )
    tiny_processor.tokenizer.model_max_length = length - 1
    with pytest.raises(ValueError, match=r"more than the tokenizer's maximum of \d+ \(model_max_length\)"):  # the collator, mid-run, without the row id
        UniMoEDataCollator(tiny_processor, tmp_path)([row])
    with pytest.raises(ValueError, match=rf"^row long-text: {length} tokens .* maximum of {length - 1} \(the tokenizer's model_max_length\)"):
        validate_dataset(dataset, tmp_path, processor=tiny_processor)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"id": "no-conv", "image": None}, r"^row no-conv: .*conversation"),
        ({"id": "empty-conv", "conversations": []}, r"^row empty-conv: .*conversation is empty"),
        ({"id": "question-only", "conversations": [{"from": "human", "value": "Hi"}]}, r"^row question-only: no assistant turn"),
    ],
)
def test_rows_without_a_conversation_to_learn_are_refused(tmp_path, row, message):
    # a missing `conversations` (None once `datasets` unifies the rows) was a bare TypeError; an empty one, or one
    # without an assistant reply, passed and gave a NaN loss (every label masked) at an unnamed training step
    rows = [row, _qa("ok", question="Hi", answer="hello")]
    dataset = load_conversations(str(write_rows(tmp_path, rows)))
    with pytest.raises(ValueError, match=message):
        validate_dataset(dataset, tmp_path)


def test_nan_or_infinite_media_are_refused(tmp_path):
    # NaN audio gave NaN features, then a NaN loss that stopped training at a step, not a row; the media loaders may
    # refuse them too (then validation reports their reason), either way the row and the file are named
    _write_nan_audio(tmp_path / "nan.wav")
    _write_nan_image(tmp_path / "nan.tif")
    for row, path in (
        (_qa("nan-audio", audio="nan.wav"), tmp_path / "nan.wav"),
        (_qa("nan-image", question="<image>\nColour?", image="nan.tif"), tmp_path / "nan.tif"),
    ):
        with pytest.raises(ValueError) as error:
            validate_dataset(load_conversations(str(write_rows(tmp_path, [row]))), tmp_path)
        kind = "audio" if path.suffix == ".wav" else "image"
        assert str(error.value).startswith(f"row {row['id']}: {kind} file {str(path)!r} "), str(error.value)
        assert "NaN or infinite" in str(error.value)


@pytest.mark.parametrize(
    "message, error",
    [
        ({"role": "robot", "content": [{"type": "text", "text": "beep"}]}, r"^row odd-1.*'robot'"),
        ({"role": "user", "content": [{"type": "file", "path": "red.png"}]}, r"^row odd-1.*'file'"),
    ],
)
def test_unknown_roles_and_content_types_are_refused(tmp_path, tiny_processor, message, error):
    # both passed validation and failed in the collator (the processor's chat check) mid-run, without the row id
    write_image(tmp_path / "red.png")
    row = {"id": "odd-1", "messages": [message, {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]}
    dataset = load_conversations(str(write_rows(tmp_path, [row])))
    with pytest.raises(ValueError, match=error):
        validate_dataset(dataset, tmp_path, processor=tiny_processor)


def test_skip_invalid_drops_and_counts_every_kind_of_bad_row(tmp_path, tiny_processor, caplog):
    write_image(tmp_path / "red.png")
    write_audio(tmp_path / "beep.wav")
    write_audio(tmp_path / "long.wav", seconds=20)
    _write_nan_audio(tmp_path / "nan.wav")
    rows = [
        _qa("good-1", audio="beep.wav"),
        _qa("long-audio", audio="long.wav"),
        _qa("nan-audio", audio="nan.wav"),
        {"id": "no-conv"},
        {"id": "empty-conv", "conversations": []},
        {"id": "question-only", "conversations": [{"from": "human", "value": "Hi"}]},
        _qa("long-text", question="<image>\n" + "colour " * 3000, image="red.png"),
        _qa("good-2", question="<image>\nColour?", answer="red", image="red.png"),
    ]
    dataset = load_conversations(str(write_rows(tmp_path, rows)))
    with caplog.at_level("WARNING"):
        kept = validate_dataset(dataset, tmp_path, skip_invalid=True, processor=tiny_processor)
    assert kept["id"] == ["good-1", "good-2"]
    assert "Dropped 6 invalid row(s) of 8" in caplog.text
    for row_id in ("long-audio", "nan-audio", "no-conv", "empty-conv", "question-only", "long-text"):
        assert f"row {row_id}: " in caplog.text
    UniMoEDataCollator(tiny_processor, tmp_path)(list(kept))  # what is kept trains


def test_each_media_file_is_decoded_once(tmp_path, monkeypatch):
    from tests.utils.media import tone
    import trl_scripts.training.data as data

    write_audio(tmp_path / "beep.wav")
    calls = []
    monkeypatch.setattr(data, "load_audio", lambda *args, **kwargs: calls.append(args[0]) or tone(1.0))
    dataset = load_conversations(str(write_rows(tmp_path, [_qa(f"row-{i}", audio="beep.wav") for i in range(5)])))
    assert len(validate_dataset(dataset, tmp_path)) == 5
    assert calls == [str(tmp_path / "beep.wav")]


def test_training_validates_with_the_stage_processor_and_model_maximum(tmp_path):
    from transformers import TrainingArguments

    from trl_scripts.training.train import DataArguments, StageArguments, load_stage_processor, run

    processor, max_length = load_stage_processor("tiny", 1)
    assert processor.feature_extractor.max_audio_windows == 4 and max_length == 2048
    assert load_stage_processor("tiny", 2) == (None, None)  # load_stage_model refuses it, with its own message
    write_audio(tmp_path / "long.wav", seconds=20)
    write_rows(tmp_path, [_qa("long-audio", audio="long.wav")])
    data = DataArguments(train_files=[str(tmp_path / "data.jsonl")], media_root=str(tmp_path))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", use_cpu=True, save_strategy="no")
    with pytest.raises(ValueError, match=r"^row long-audio: audio file .*long\.wav' lasts 20\.0 s \(5 windows of 4 s\)"):
        run(StageArguments(stage=1, model_name_or_path="tiny"), data, args)


# ------------------------------------------------------------------------------------- review: rows, files, media


def test_text_only_rows_are_refused_when_the_stage_needs_media(tmp_path, caplog):
    """Stage 1 trains only the connectors: a text-only batch has no gradient ("element 0 of tensors does not require
    grad" mid-run). `media_required` names every text-only row before training, or skip_invalid drops and counts them."""
    write_image(tmp_path / "red.png")
    rows = [_qa("img-1", question="<image>\nColour?", answer="red", image="red.png"),
            _qa("txt-1", question="Hi", answer="hello"), _qa("txt-2", question="Bye", answer="bye")]  # fmt: skip
    dataset = load_conversations(str(write_rows(tmp_path, rows)))
    assert len(validate_dataset(dataset, tmp_path)) == 3  # other stages train the language model: text-only is fine
    reason = "stage 1 trains only the connectors"
    with pytest.raises(ValueError, match=r"^2 text-only row\(s\) of 3 \(no image, video or audio\): txt-1, txt-2\. Stage 1 trains"):
        validate_dataset(dataset, tmp_path, media_required=reason)
    with caplog.at_level("WARNING"):
        kept = validate_dataset(dataset, tmp_path, skip_invalid=True, media_required=reason)
    assert kept["id"] == ["img-1"] and "Dropped 2 invalid row(s) of 3" in caplog.text and "row txt-2: text-only" in caplog.text
    with pytest.raises(ValueError, match=r"^no valid row left: all 2 row\(s\) are invalid \(first: row txt-1: text-only"):
        validate_dataset(dataset.select([1, 2]), tmp_path, skip_invalid=True, media_required=reason)


def test_data_files_of_both_formats_and_types_load_together(tmp_path, tiny_processor):
    """Each file loads alone, then they are concatenated: a `conversations` file with a `messages` file (one
    schema for both made `datasets` fail with a 61-line DatasetGenerationError naming neither file), and an `image`
    that is a path in one file and a list in another."""
    write_image(tmp_path / "red.png")
    write_image(tmp_path / "blue.png", color=(0, 0, 255))
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([_qa("llava-1", question="<image>\nColour?", answer="red", image="red.png")]))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"id": "chat-1", "messages": [
        {"role": "user", "content": [{"type": "image", "path": "red.png"}, {"type": "text", "text": "Shape?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "square"}]}]}))  # fmt: skip
    two = tmp_path / "two.json"
    two.write_text(json.dumps([_qa("two-1", question="<image>\n<image>\nSame?", answer="no", image=["red.png", "blue.png"])]))
    dataset = load_conversations([str(llava), str(chat), str(two)])
    assert dataset["id"] == ["llava-1", "chat-1", "two-1"]
    kept = validate_dataset(dataset, tmp_path, processor=tiny_processor)
    assert [modality_mix(row) for row in kept] == ["image", "image", "image"]
    assert UniMoEDataCollator(tiny_processor, tmp_path)(list(kept))["pixel_values"].shape[0] == 4


@pytest.mark.parametrize(
    "name, text, error, message",
    [
        ("bad.json", '[{"id": "a",\n "conversations": }]', ValueError, r"data file .*bad\.json: invalid JSON at line 2, column 19"),
        ("bad.jsonl", '{"id": "a"}\n{"id": \n', ValueError, r"data file .*bad\.jsonl: line 2 is not valid JSON \(column 8"),
        ("empty.json", "[]", ValueError, r"data file .*empty\.json: no rows \(an empty JSON list\)"),
        ("zero.json", "", ValueError, r"data file .*zero\.json is empty"),
        ("blank.jsonl", "\n  \n", ValueError, r"data file .*blank\.jsonl: the file is empty"),
        ("numbers.json", "[1, 2]", ValueError, r"data file .*numbers\.json: its first row is not a JSON object"),
        ("missing.json", None, FileNotFoundError, r"no such data file: .*missing\.json"),
    ],
    ids=lambda value: value if isinstance(value, str) and value.endswith(("json", "jsonl")) else "",
)
def test_a_bad_data_file_is_named_with_its_problem(tmp_path, name, text, error, message):
    good = tmp_path / "good.json"
    good.write_text(json.dumps([_qa("ok-1", question="Hi", answer="hello")]))
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(error, match=message):
        load_conversations([str(good), str(tmp_path / name)])


def test_media_under_the_block_type_key_is_a_path(tmp_path, tiny_processor):
    """`{"type": "image", "image": "x.png"}` (the processor's and README's form) is resolved, validated and counted
    like `path` (it was refused: "1 <image> placeholder(s) ... but 0 image item(s)"); URLs, a file given twice and
    a value that is not a path are refused naming the block."""
    (tmp_path / "media").mkdir()
    write_image(tmp_path / "media" / "red.png")

    def row(block, row_id="by-type-key"):
        return {"id": row_id, "messages": [
            {"role": "user", "content": [block, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}  # fmt: skip

    dataset = load_conversations(str(write_rows(tmp_path, [row({"type": "image", "image": "media/red.png"})])))
    kept = validate_dataset(dataset, tmp_path, processor=tiny_processor)
    assert to_messages(kept[0], tmp_path)[0]["content"][0] == {"type": "image", "path": str(tmp_path / "media/red.png")}
    assert modality_mix(kept[0]) == "image"
    assert UniMoEDataCollator(tiny_processor, tmp_path)(list(kept))["pixel_values"].shape[0] == 1
    dataset = load_conversations(str(write_rows(tmp_path, [row({"type": "image", "image": "media/gone.png"}, "gone")])))
    with pytest.raises(ValueError, match=r"^row gone: image file .*media/gone\.png' is missing or unreadable"):
        validate_dataset(dataset, tmp_path)

    at = r"^row by-type-key, message 0, content block 0: "
    for block, message in [
        ({"type": "image", "image": "https://example.com/red.png"}, at + r"image URL 'https://example.com/red.png': only local media files"),
        ({"type": "image", "url": "http://example.com/red.png"}, at + r"image URL .*only local media files are supported"),
        ({"type": "image", "image": "media/red.png", "path": "media/red.png"}, at + r"image block with (both )?'image' and 'path'"),
        ({"type": "audio", "audio": 5}, at + r"audio 'audio' must be a file path \(a str\), got int"),
    ]:
        with pytest.raises(ValueError, match=message):
            to_messages(row(block), tmp_path)
