"""Content the chat template would drop or render wrongly is refused, never lost (issue 14, items 2 and 5).

Uni-MoE's chat template is Vicuna v1: one optional system prompt first, then `user` / `assistant` turns of text and
image, video and audio placeholders. Anything else (another role or block type, a late system message, text that
is not a string, an empty conversation) used to be dropped or rendered as `None`, `5`, `<bytes>`; now the processor
refuses it, naming the message (and the sample of a batch), for `tokenize=False` as for `tokenize=True`; the
template itself refuses it for anyone rendering it directly; training and evaluation rows are refused with their id.
"""

import io
import json

import datasets
import numpy as np
import pytest
from jinja2.exceptions import TemplateError

from tests.utils.media import write_image, write_video
from trl_scripts.evaluation.evaluate import load_eval_samples
from trl_scripts.training.data import UniMoEDataCollator, to_messages


def user(content, role="user"):
    return {"role": role, "content": content}


# (case, conversation, exception type, message pattern); a single conversation, refused at message level
REFUSED = [
    ("pdf block", [user([{"type": "pdf", "path": "paper.pdf"}, {"type": "text", "text": "Summarise."}])],
     ValueError, r"^message 0, content block 0 has type 'pdf', which Uni-MoE does not support \(it takes text, image, video, audio\)$"),
    ("input_audio block", [user([{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}])],
     ValueError, r"^message 0, content block 0 has type 'input_audio', .*give audio as \{'type': 'audio'"),
    ("tool role", [user("What is 2+2?"), user("4", role="tool")],
     ValueError, r"^message 1 has role 'tool', which Uni-MoE's chat template does not support \(it knows 'system', 'user' and 'assistant'\); Uni-MoE was not trained with tool messages$"),
    ("human role", [user("Hi", role="human")],
     ValueError, r"^message 0 has role 'human', .*; use 'user' \(LLaVA's 'human' and 'gpt'"),
    ("gpt role", [user("Hi"), user("Hello", role="gpt")], ValueError, r"^message 1 has role 'gpt', .*; use 'assistant'"),
    ("User role", [user("Hi", role="User")], ValueError, r"^message 0 has role 'User', .*; roles are case-sensitive: use 'user'$"),
    ("no role", [{"content": "Hi"}], ValueError, r"^message 0 has no role \(expected 'system', 'user' or 'assistant'\)$"),
    ("role None", [{"role": None, "content": "Hi"}], ValueError, r"^message 0 has no role"),
    ("late system", [user("Hi"), user("Be terse.", role="system")],
     ValueError, r"^message 1 is a system message after the first turn: Vicuna v1 has one system prompt, the first message$"),
    ("second system", [user("Be kind.", role="system"), user("Be terse.", role="system"), user("Hi")],
     ValueError, r"^message 1 is a system message after the first turn"),
    ("bytes text", [user([{"type": "text", "text": b"What colour?"}])],
     TypeError, r"^message 0, content block 0: text must be a str, got bytes$"),
    ("None text", [user([{"type": "text", "text": None}])], TypeError, r"^message 0, content block 0: text must be a str, got NoneType$"),
    ("number text", [user([{"type": "text", "text": 5}])], TypeError, r"^message 0, content block 0: text must be a str, got int$"),
    ("text block without text", [user([{"type": "text", "content": "Hi"}])], ValueError, r"^message 0, content block 0 is a text block without 'text'$"),
    ("block without type", [user([{"text": "Hi"}])],
     ValueError, r"^message 0, content block 0 has no 'type' \(expected one of text, image, video, audio\)$"),
    ("block not a dict", [user(["Hi"])], TypeError, r"^message 0, content block 0 is of type str, expected a dict with a 'type'"),
    ("number content", [user(5)], TypeError, r"^message 0: content is of type int, expected a str or a list of content blocks$"),
    ("dict content", [user({"type": "text", "text": "Hi"})], TypeError, r"^message 0: content is of type dict"),
    ("text on a media block", [user([{"type": "image", "text": "a red square"}])],
     ValueError, r"^message 0, content block 0: image blocks carry no text \(it would be dropped\); put it in a text block$"),
    ("tool calls", [user("Weather?"), {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}],
     ValueError, r"^message 1 has 'tool_calls', which Uni-MoE's chat template \(Vicuna v1\) has no format for$"),
    ("image on a text block", [user([{"type": "text", "text": "What colour?", "image": "red.png"}])],
     ValueError, r"^message 0, content block 0: text blocks carry no 'image' \(it would be dropped\); give each image, video and audio its own block of that type$"),
    ("path on a text block", [user([{"type": "text", "text": "Said?", "path": "beep.wav"}])],
     ValueError, r"^message 0, content block 0: text blocks carry no 'path' \(it would be dropped\); give media their own block"),
    ("video on an image block", [user([{"type": "image", "path": "red.png", "video": "move.mp4"}])],
     ValueError, r"^message 0, content block 0: image blocks carry no 'video' \(it would be dropped\)"),
    ("two sources", [user([{"type": "image", "image": "red.png", "path": "blue.png"}])],
     ValueError, r"^message 0, content block 0: image block with 'image' and 'path': it takes exactly one of 'image', 'path' or 'url'$"),
    ("three sources", [user([{"type": "audio", "audio": "a.wav", "path": "b.wav", "url": "c.wav"}])],
     ValueError, r"^message 0, content block 0: audio block with 'audio' and 'path' and 'url': it takes exactly one of"),
    # typed placeholders stand for no media item: a processor refuses the count, but vLLM without media never calls one
    ("image placeholder typed in text", [user([{"type": "text", "text": "Describe <image> please"}])],
     ValueError, r"^message 0, content block 0: its text holds the placeholder <image>, which stands for media; send the image as a content block of type 'image'$"),
    ("video placeholder beside a video", [user([{"type": "video", "path": "v.mp4"}, {"type": "text", "text": "<video>\nWhat moves?"}])],
     ValueError, r"^message 0, content block 1: its text holds the placeholder <video>"),
    ("audio placeholder in an assistant turn", [user("Hi"), user([{"type": "text", "text": "I hear <audio>"}], role="assistant")],
     ValueError, r"^message 1, content block 0: its text holds the placeholder <audio>"),
]  # fmt: skip


@pytest.mark.parametrize("tokenize", [False, True], ids=["text", "tokenized"])
@pytest.mark.parametrize("case, conversation, error, message", REFUSED, ids=[case[0] for case in REFUSED])
def test_the_processor_refuses_what_the_template_would_drop(tiny_processor, tokenize, case, conversation, error, message):
    with pytest.raises(error, match=message):
        tiny_processor.apply_chat_template(conversation, tokenize=tokenize, return_dict=tokenize)


@pytest.mark.parametrize("case, conversation, error, message", REFUSED, ids=[case[0] for case in REFUSED])
def test_a_batch_names_the_sample(tiny_processor, case, conversation, error, message):
    good = [user("Hi"), user("Hello", role="assistant")]
    with pytest.raises(error, match="^sample 2, " + message.lstrip("^")):
        tiny_processor.apply_chat_template([good, good, conversation], tokenize=True, return_dict=True, return_labels=True)


@pytest.mark.parametrize("tokenize", [False, True], ids=["text", "tokenized"])
def test_empty_conversations_are_refused(tiny_processor, tokenize):
    with pytest.raises(ValueError, match=r"^the conversation is empty: apply_chat_template needs at least one message$"):
        tiny_processor.apply_chat_template([], tokenize=tokenize)
    with pytest.raises(ValueError, match=r"^sample 0: the conversation is empty: it needs at least one message$"):
        tiny_processor.apply_chat_template([[]], tokenize=tokenize)
    with pytest.raises(ValueError, match=r"^sample 1: the conversation is empty"):
        tiny_processor.apply_chat_template([[user("Hi")], []], tokenize=tokenize)


def test_wrong_types_are_value_errors_too(tiny_processor):
    """A wrong type is a TypeError, and a ValueError like every other refused input, so that handlers of bad rows
    (`validate_dataset(skip_invalid=True)`, the evaluation's batch errors) catch it."""
    with pytest.raises(ValueError) as caught:
        tiny_processor.apply_chat_template([user([{"type": "text", "text": b"x"}])])
    assert isinstance(caught.value, TypeError)


def test_tools_documents_and_audio_from_video_are_refused(tiny_processor):
    tool = {"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(ValueError, match=r"has no format for tools; `tools` cannot be used"):
        tiny_processor.apply_chat_template([user("Hi")], tools=[tool])
    with pytest.raises(ValueError, match=r"has no format for documents"):
        tiny_processor.apply_chat_template([user("Hi")], documents=[{"title": "t", "text": "x"}])
    with pytest.raises(ValueError, match=r"does not load audio from videos"):
        tiny_processor.apply_chat_template([user([{"type": "video", "path": "v.mp4"}])], tokenize=True, load_audio_from_video=True)


def test_valid_conversations_still_render(tiny_processor):
    """String content, missing or None content (an empty message), OpenAI `image_url` blocks (transformers turns
    them into image blocks), and a system message first are all fine."""
    system = "Be terse."
    prompt = tiny_processor.apply_chat_template(
        [
            {"role": "system", "content": system},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": None},
            {"role": "assistant"},
        ]
    )
    assert prompt == "Be terse. USER: <image>\nColour? ASSISTANT: red</s>USER:ASSISTANT:"


@pytest.mark.parametrize("where", ["argument", "processor_kwargs"])
def test_num_frames_given_to_apply_chat_template_is_honoured(tiny_processor, where):
    frames = [np.full((20, 20, 3), i * 20, dtype=np.uint8) for i in range(6)]
    conversation = [user([{"type": "video", "video": frames}, {"type": "text", "text": "What moves?"}])]
    options = {"num_frames": 2} if where == "argument" else {"processor_kwargs": {"num_frames": 2}}
    out = tiny_processor.apply_chat_template(conversation, tokenize=True, return_dict=True, **options)
    assert out["pixel_values_videos"].shape[1] == 2 != tiny_processor.num_frames
    default = tiny_processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    assert default["pixel_values_videos"].shape[1] == tiny_processor.num_frames  # the next call is not affected
    # transformers' idiom for its video processors: do_sample_frames=True (Uni-MoE always samples)
    sampled = tiny_processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, processor_kwargs={"num_frames": 3, "do_sample_frames": True}
    )
    assert sampled["pixel_values_videos"].shape[1] == 3
    labelled = tiny_processor.apply_chat_template(
        [*conversation, user("It moves.", role="assistant")], tokenize=True, return_dict=True, return_labels=True, num_frames=2
    )
    assert labelled["pixel_values_videos"].shape[1] == 2


def test_bad_frame_options_name_themselves(tiny_processor):
    conversation = [user([{"type": "video", "video": [np.zeros((8, 8, 3), np.uint8)] * 3}])]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=rf"^num_frames must be a positive integer \(1 or more frames sampled per video\), got {bad!r}$"):
            tiny_processor.apply_chat_template(conversation, tokenize=True, num_frames=bad)
    with pytest.raises(ValueError, match=r"it has no `fps` option"):
        tiny_processor.apply_chat_template(conversation, tokenize=True, processor_kwargs={"fps": 2})
    with pytest.raises(ValueError, match=r"always samples num_frames=4 frames"):
        tiny_processor.apply_chat_template(conversation, tokenize=True, processor_kwargs={"do_sample_frames": False})
    with pytest.raises(ValueError, match=r"num_frames=2 and processor_kwargs num_frames=3 disagree"):
        tiny_processor.apply_chat_template(conversation, tokenize=True, num_frames=2, processor_kwargs={"num_frames": 3})


# ------------------------------------------------------------------------------------ the template rendered directly

TEMPLATE_REFUSED = [
    ("pdf block", [user([{"type": "pdf", "path": "paper.pdf"}])], r"message 0, content block 0 has type 'pdf'"),
    ("tool role", [user("Hi"), user("4", role="tool")], r"message 1 has role 'tool'"),
    ("User role", [user("Hi", role="User")], r"message 0 has role 'User'"),
    ("no role", [{"content": "Hi"}], r"message 0 has no role"),
    ("late system", [user("Be kind.", role="system"), user("Hi"), user("Be terse.", role="system")], r"message 2 is a system message after the first turn"),
    ("None text", [user([{"type": "text", "text": None}])], r"message 0, content block 0: text must be a string"),
    ("number text", [user([{"type": "text", "text": 5}])], r"message 0, content block 0: text must be a string"),
    ("block without type", [user([{"text": "Hi"}])], r"message 0, content block 0 has no 'type'"),
    ("block not a dict", [user(["Hi"])], r"message 0, content block 0 is not a dict"),
    ("number content", [user(5)], r"message 0: content must be a string or a list of content blocks"),
    ("image placeholder typed in text", [user([{"type": "text", "text": "Describe <image> please"}])],
     r"message 0, content block 0: its text holds the placeholder <image>, which stands for media; send the image as a content block of type 'image'"),
    ("audio placeholder in text", [user([{"type": "image"}, {"type": "text", "text": "and <audio>"}])],
     r"message 0, content block 1: its text holds the placeholder <audio>"),
]  # fmt: skip


@pytest.mark.parametrize("case, conversation, message", TEMPLATE_REFUSED, ids=[case[0] for case in TEMPLATE_REFUSED])
def test_the_template_itself_refuses(tiny_processor, case, conversation, message):
    """For anyone rendering the template without the processor, e.g. `tokenizer.apply_chat_template`."""
    with pytest.raises(TemplateError, match=message):
        tiny_processor.tokenizer.apply_chat_template(conversation, chat_template=tiny_processor.chat_template, tokenize=False)


def test_the_template_refuses_an_empty_conversation(tiny_processor):
    """(`tokenizer.apply_chat_template` refuses an empty conversation itself, before rendering.)"""
    from transformers.utils.chat_template_utils import render_jinja_template

    with pytest.raises(TemplateError, match=r"^the conversation is empty: it needs at least one message$"):
        render_jinja_template([[]], chat_template=tiny_processor.chat_template)


# ------------------------------------------------------------------------------------------------- training rows

LLAVA_REFUSED = [
    ("tool speaker", [{"from": "human", "value": "2+2?"}, {"from": "tool", "value": "4"}],
     ValueError, r"^row r1, turn 1: unknown speaker 'tool' \(expected one of human, user, gpt, assistant, system\)$"),
    ("Human speaker", [{"from": "Human", "value": "Hi"}], ValueError, r"^row r1, turn 0: unknown speaker 'Human' .*; speakers are case-sensitive$"),
    ("no speaker", [{"value": "Hi"}], ValueError, r"^row r1, turn 0 has no 'from'"),
    ("late system", [{"from": "human", "value": "Hi"}, {"from": "system", "value": "Be terse."}],
     ValueError, r"^row r1, turn 1: a system turn after the first turn; Vicuna v1 has one system prompt, the first turn$"),
    ("bytes value", [{"from": "human", "value": b"Hi"}], TypeError, r"^row r1, turn 0: 'value' must be a str, got bytes$"),
    ("None value", [{"from": "human", "value": None}], TypeError, r"^row r1, turn 0: 'value' must be a str, got NoneType$"),
    ("number value", [{"from": "human", "value": 5}], TypeError, r"^row r1, turn 0: 'value' must be a str, got int$"),
    ("no value", [{"from": "human"}], ValueError, r"^row r1, turn 0 has no 'value'$"),
    ("turn not a dict", ["Hi"], TypeError, r"^row r1, turn 0 is of type str"),
    ("empty", [], ValueError, r"^row r1: the conversation is empty"),
]  # fmt: skip


@pytest.mark.parametrize("case, turns, error, message", LLAVA_REFUSED, ids=[case[0] for case in LLAVA_REFUSED])
def test_llava_rows_are_refused_with_their_id(case, turns, error, message):
    with pytest.raises(error, match=message):
        to_messages({"id": "r1", "conversations": turns})


def test_a_row_without_a_conversation_is_named():
    with pytest.raises(ValueError, match=r"^row r1: no conversation \(expected 'conversations' or 'messages'\)$"):
        to_messages({"id": "r1", "image": "a.png"})


@pytest.mark.parametrize("case, conversation, error, message", REFUSED, ids=[case[0] for case in REFUSED])
def test_chat_rows_are_refused_with_their_id(case, conversation, error, message):
    if case == "None text":  # in a `datasets` table None is a missing key: a text block without text
        error, message = ValueError, r"^message 0, content block 0 is a text block without 'text'$"
    with pytest.raises(error, match="^row r1, " + message.lstrip("^")):
        to_messages({"id": "r1", "messages": conversation})


def test_empty_chat_rows_and_media_blocks_without_a_path_are_refused():
    with pytest.raises(ValueError, match=r"^row r1: the conversation is empty"):
        to_messages({"id": "r1", "messages": []})
    with pytest.raises(ValueError, match=r"^row r1, message 0, content block 1: image block without a path$"):
        to_messages({"id": "r1", "messages": [user([{"type": "text", "text": "Colour?"}, {"type": "image"}])]})


def test_the_collator_never_trains_on_a_row_with_dropped_content(tiny_processor):
    good = {"id": "ok", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hello"}]}
    bad = {"id": "bad-3", "messages": [
        user([{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}, {"type": "text", "text": "What is said?"}]),
        user("hello", role="assistant")]}  # fmt: skip
    with pytest.raises(ValueError, match=r"^row bad-3, message 0, content block 0 has type 'input_audio'"):
        UniMoEDataCollator(tiny_processor)([good, bad])
    late_system = {"id": "bad-4", "conversations": [*good["conversations"], {"from": "system", "value": "Be terse."}]}
    with pytest.raises(ValueError, match=r"^row bad-4, turn 2: a system turn after the first turn"):
        UniMoEDataCollator(tiny_processor, system_prompt="Be kind.")([good, late_system])


def test_keys_datasets_fills_with_none_are_not_content(tmp_path, tiny_processor):
    """A `datasets` table (`Dataset.from_list`, parquet, the hub) gives every content block each key of the column,
    None where a block has none: those are no content (a None `image` next to a `path` is not a second image)."""
    image = write_image(tmp_path / "red.png")
    rows = [
        {"id": "by-path", "messages": [
            user([{"type": "image", "path": "red.png"}, {"type": "text", "text": "Colour?"}]),
            user([{"type": "text", "text": "red"}], role="assistant")]},
        {"id": "by-image", "messages": [
            user([{"type": "image", "image": str(image)}, {"type": "text", "text": "Shape?"}]),
            user([{"type": "text", "text": "square"}], role="assistant")]},
    ]  # fmt: skip
    dataset = datasets.Dataset.from_list(rows)
    assert dataset[0]["messages"][0]["content"][0] == {"type": "image", "path": "red.png", "text": None, "image": None}
    assert to_messages(dataset[0], tmp_path)[0]["content"][0] == {"type": "image", "path": str(image)}
    batch = UniMoEDataCollator(tiny_processor, tmp_path)(list(dataset))
    assert batch["pixel_values"].shape[0] == 2
    tokenizer = tiny_processor.tokenizer
    answers = [tokenizer.decode(ids[labels != -100]).replace(" ", "") for ids, labels in zip(batch["input_ids"], batch["labels"])]
    assert answers == ["red</s>", "square</s>"]

    # a text block whose text is None (missing) is refused, not rendered as "None"
    dataset = datasets.Dataset.from_list([*rows, {"id": "no-text", "messages": [user([{"type": "text", "text": None}])]}])
    with pytest.raises(ValueError, match=r"^row no-text, message 0, content block 0 is a text block without 'text'$"):
        to_messages(dataset[2], tmp_path)


# ---------------------------------------------------------------------------------------------- evaluation rows


@pytest.mark.parametrize(
    "messages, message",
    [
        ([user([{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}, {"type": "text", "text": "Said?"}])],
         r"^row q-1, message 0, content block 0 has type 'input_audio'"),
        ([user("Hi"), user("4", role="tool"), user("Sum?")], r"^row q-1, message 1 has role 'tool'"),
        ([user("Hi"), user("Be terse.", role="system")], r"^row q-1, message 1 is a system message after the first turn"),
        ([user([{"type": "text", "text": 5}])], r"^row q-1, message 0, content block 0: text must be a str, got int$"),
    ],
    ids=["input_audio", "tool", "late system", "number text"],
)
def test_evaluation_rows_are_refused_before_the_model_loads(tmp_path, messages, message):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"id": "q-1", "messages": [*messages, user("yes", role="assistant")]}]))
    with pytest.raises(ValueError, match=message):
        load_eval_samples(data, "vqa")


# ------------------------------------------------------------------------------------- second review: chat inputs


@pytest.mark.parametrize("block", [{"type": "image"}, {"type": "audio", "path": None}, {"type": "video", "url": None}],
                         ids=["no source", "path None", "url None"])  # fmt: skip
def test_media_blocks_without_a_source_are_refused_when_tokenized(tiny_processor, block):
    """Tokenized, a media block's media are loaded: without a source it was a count error naming no block. Rendered
    only (`tokenize=False`), `{"type": "image"}` stays the placeholder idiom (the media passed to the processor)."""
    kind = block["type"]
    conversation = [user([{"type": "text", "text": "What is it?"}, block])]
    with pytest.raises(ValueError, match=(
        rf"^message 0, content block 1: {kind} block without its {kind}: it takes exactly one of '{kind}', 'path' or "
        r"'url' \(None or '' is none\)$"
    )):  # fmt: skip
        tiny_processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    with pytest.raises(ValueError, match=rf"^sample 1, message 0, content block 1: {kind} block without its {kind}"):
        tiny_processor.apply_chat_template([[user("Hi")], conversation], tokenize=True, return_dict=True)
    assert tiny_processor.apply_chat_template(conversation).endswith(f"USER: What is it?<{kind}>\n ")


def bad_chat_items(folder):
    frame = np.zeros((12, 12, 3), np.uint8)
    image = write_image(folder / "red.png")
    (folder / "notes.txt").write_text("not a frame")
    return [
        ("int image", {"type": "image", "image": 5}, TypeError,
         r"^image 1: expected a PIL image, an array or tensor, a file path or a binary file object, got int$"),
        ("bytes image", {"type": "image", "image": image.read_bytes()}, TypeError,
         r"^image 1: expected .*, got bytes \(encoded file bytes\? wrap them in io\.BytesIO\)$"),
        ("batch of one image", {"type": "image", "image": np.zeros((1, 12, 12, 3), np.uint8)}, ValueError,
         r"^image 1: expected an \[H, W\], \[H, W, C\] or \[C, H, W\] array with C in 1, 3 or 4, got shape \(1, 12, 12, 3\) \(a batch of one image\? take its first item\)$"),
        ("None frame", {"type": "video", "video": [frame, None, frame]}, TypeError,
         r"^video 1 frame 1: expected a PIL image, an array or tensor, a file path or a binary file object, got NoneType$"),
        ("text frame file", {"type": "video", "video": [str(image), str(folder / "notes.txt")]}, ValueError,
         r"^video 1 frame 1: cannot read image file '.*notes\.txt' \(cannot identify image file"),
        ("list audio", {"type": "audio", "audio": [0.0, 0.1, 0.2]}, TypeError,
         r"^audio 1: expected a file path or binary file object, a waveform array or tensor, .* got list \(samples as a list\? give them as an array, or with their rate: \(samples, rate\)\)$"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(6), ids=["int image", "bytes image", "batch of one image", "None frame", "text frame file", "list audio"])
def test_a_bad_item_in_a_media_block_is_named_as_itself(tiny_processor, tmp_path, case):
    """The block's value is the item, whatever it is: its own type and index, not 'got list' (the sample's list)."""
    _, block, error, message = bad_chat_items(tmp_path)[case]
    good = {"image": {"type": "image", "image": np.zeros((12, 12, 3), np.uint8)},
            "video": {"type": "video", "video": [np.zeros((12, 12, 3), np.uint8)] * 2},
            "audio": {"type": "audio", "audio": (np.zeros(1600, np.float32), 16000)}}[block["type"]]  # fmt: skip
    with pytest.raises(error, match=message):  # item 1: the first sample holds item 0
        tiny_processor.apply_chat_template([[user([good, {"type": "text", "text": "a"}])], [user([block])]], tokenize=True, return_dict=True)


def test_frame_files_and_file_objects_in_blocks_are_read(tiny_processor, tmp_path):
    image = write_image(tmp_path / "red.png")
    for name in ("frame0", "frame1"):  # image files without an image extension: read by their content
        (tmp_path / name).write_bytes(image.read_bytes())
    by_extension = tiny_processor.apply_chat_template(
        [user([{"type": "video", "video": [str(image)] * 2}])], tokenize=True, return_dict=True)["pixel_values_videos"]
    without = tiny_processor.apply_chat_template(
        [user([{"type": "video", "video": [str(tmp_path / "frame0"), str(tmp_path / "frame1")]}])], tokenize=True, return_dict=True)
    assert without["pixel_values_videos"].equal(by_extension)
    for block in ({"type": "image", "image": "", "path": str(image)}, {"type": "image", "image": io.BytesIO(image.read_bytes())}, {"type": "video", "video": io.BytesIO(write_video(tmp_path / "m.mp4").read_bytes())}):
        out = tiny_processor.apply_chat_template([user([block, {"type": "text", "text": "What?"}])], tokenize=True, return_dict=True)
        assert out["pixel_values" if block["type"] == "image" else "pixel_values_videos"].shape[0] == 1


@pytest.mark.parametrize("tokenize", [False, True], ids=["text", "tokenized"])
@pytest.mark.parametrize("conversation, hint", [
    ("hello", r"; a prompt\? as a conversation: \[\{'role': 'user', 'content': text\}\]$"),
    ({"role": "user", "content": "hello"}, r"; one message\? a conversation of one message is \[message\]$"),
    (5, r"$"),
], ids=["str", "dict", "int"])  # fmt: skip
def test_a_conversation_must_be_a_list_of_messages(tiny_processor, tokenize, conversation, hint):
    """Was transformers' "Chat messages should be dicts ... but got 'h'" (the first letter taken for a message)."""
    kind = type(conversation).__name__
    with pytest.raises(TypeError, match=(
        rf"^the conversation is of type {kind}: a conversation is a list of message dicts \(\{{'role': \.\.\., 'content': "
        rf"\.\.\.\}}\) and a batch a list of conversations{hint}"
    )) as caught:  # fmt: skip
        tiny_processor.apply_chat_template(conversation, tokenize=tokenize)
    assert isinstance(caught.value, ValueError)  # caught by the handlers of bad rows too


def test_batched_chat_is_padded_by_default(tiny_processor):
    """Several conversations returned as tensors were refused by transformers ("Unable to convert output") unless
    `processor_kwargs={"padding": True}`: now padded by default, labels with -100; one conversation is unchanged."""
    short = [user("Hi"), user("Hello", role="assistant")]
    long = [user("What colour is the sky on a clear day?"), user("It is blue.", role="assistant")]
    for options in ({}, {"return_labels": True}):
        out = tiny_processor.apply_chat_template([short, long], tokenize=True, return_dict=True, **options)
        explicit = tiny_processor.apply_chat_template(
            [short, long], tokenize=True, return_dict=True, processor_kwargs={"padding": True}, **options)
        assert out.keys() == explicit.keys()
        for key in out:
            assert out[key].equal(explicit[key]), key
    mask, labels = out["attention_mask"], out["labels"]
    assert (labels[mask == 0] == -100).all() and (mask[0] == 0).any()
    for sample, conversation in enumerate((short, long)):  # each sample's labels are those of its own call
        alone = tiny_processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_labels=True)
        assert labels[sample][mask[sample] == 1].equal(alone["labels"][0])
        unpadded = tiny_processor.apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_labels=True, processor_kwargs={"padding": False})
        assert alone["input_ids"].equal(unpadded["input_ids"]) and alone["labels"].equal(unpadded["labels"])
    ids = tiny_processor.apply_chat_template([short, long], tokenize=True)
    assert ids.shape == out["input_ids"].shape
