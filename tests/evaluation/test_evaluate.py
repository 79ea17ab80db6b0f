"""`python -m trl_scripts.evaluate` end to end on a tiny checkpoint: every task, both data formats, bad input.

The tiny model is random, so its answers are gibberish. To get metrics that are not all zero, the tests first generate
each prompt alone (no batching) and then write data files whose references are, for chosen rows, exactly what the model
answers: the expected metric values follow by construction, and the CLI's batched, left-padded generation must give
the same answers as the prompts alone.
"""

import json
import os
import re
import shutil
import string
import subprocess
import sys

import pytest
import sacrebleu
from PIL import Image

from tests.utils import REPO_ROOT
from tests.utils.models import make_tiny_model
from trl_scripts import load_tiny_processor
from trl_scripts.evaluation.evaluate import load_eval_samples, main
from trl_scripts.loading import load_model_and_processor
from trl_scripts.evaluation.metrics import load_metric
from trl_scripts.quickstart.make_synthetic_data import make_synthetic_dataset
from trl_scripts.training.data import to_messages


MAX_NEW_TOKENS = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    make_tiny_model(text_only=False).save_pretrained(folder)
    load_tiny_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """14 held-out rows (7 tasks x 2: image, video, audio, speech) with their media."""
    paths = make_synthetic_dataset(
        tmp_path_factory.mktemp("data"), num_train_per_task=1, num_eval_per_task=2, use_espeak=False
    )
    return {"root": paths["eval"].parent, "rows": json.loads(paths["eval"].read_text())}


def greedy_answers(model, processor, rows: list[dict], root) -> list[str]:
    """Each row's answer from `model.generate` (greedy), one row at a time: what the CLI's predictions must equal."""
    answers = []
    for row in rows:
        messages = to_messages(row, root)[:-1]
        inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        answers.append(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return answers


@pytest.fixture(scope="module")
def single_answers(checkpoint, synthetic):
    """The greedy answer to each held-out prompt, generated alone."""
    model, processor = load_model_and_processor(str(checkpoint), device="cpu")
    return greedy_answers(model, processor, synthetic["rows"], synthetic["root"])


def with_answer(row: dict, answer: str) -> dict:
    return {**row, "conversations": [row["conversations"][0], {"from": "gpt", "value": answer}]}


def run_cli(checkpoint, data, task, output_dir, *extra) -> tuple[list[dict], dict]:
    main(["--model", str(checkpoint), "--data", str(data), "--task", task, "--output_dir", str(output_dir),
          "--max_new_tokens", str(MAX_NEW_TOKENS), *map(str, extra)])  # fmt: skip
    return read_outputs(output_dir)


def read_outputs(output_dir) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]
    result = json.loads((output_dir / "metrics.json").read_text())
    assert set(result) == {"task", "dataset", "metrics", "num_samples"}
    assert result["num_samples"] == len(lines)
    assert all(type(value) is float for value in result["metrics"].values())
    return lines, result


def squad_normalise(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_vqa_end_to_end_batched_like_single_prompts(checkpoint, synthetic, single_answers, tmp_path):
    rows = synthetic["rows"]
    # every other row's reference is the model's own answer: those are right, the others (real words) wrong
    rows = [
        with_answer(row, single_answers[i]) if i % 2 == 0 and single_answers[i] else row for i, row in enumerate(rows)
    ]
    data = synthetic["root"] / "eval_scored.json"
    data.write_text(json.dumps(rows))

    lines, result = run_cli(checkpoint, data, "vqa", tmp_path / "out", "--batch_size", 4)

    assert [line["id"] for line in lines] == [row["id"] for row in rows]
    assert [line["prediction"] for line in lines] == single_answers  # batched, left-padded == alone
    assert [line["references"] for line in lines] == [[row["conversations"][1]["value"]] for row in rows]
    assert [line["prompt"] for line in lines] == [row["conversations"][0]["value"] for row in rows]
    assert [line["group"] for line in lines] == [row["modality"] for row in rows]
    assert result["task"] == "vqa"
    assert result["dataset"] == {"name": "eval_scored", "type": "eval_scored", "split": "test"}

    # recompute from the JSONL alone
    correct = [squad_normalise(line["prediction"]) == squad_normalise(line["references"][0]) for line in lines]
    metrics = result["metrics"]
    assert metrics["exact_match"] == pytest.approx(mean(correct))
    assert metrics["exact_match"] >= sum(1 for i in range(0, len(rows), 2) if single_answers[i]) / len(rows) > 0
    # one reference each: VQA accuracy is a plain match here, and the matches are the rows answered by construction
    assert metrics["vqa_accuracy"] == pytest.approx(mean(line["prediction"] == line["references"][0] for line in lines))
    for modality in ("image", "video", "audio", "speech"):
        group = [ok for ok, line in zip(correct, lines) if line["group"] == modality]
        assert metrics[f"exact_match/{modality}"] == pytest.approx(mean(group))
        assert f"vqa_accuracy/{modality}" in metrics
    assert len(metrics) == 2 * (1 + 4)


def test_quantization_int8_evaluates_the_int8_language_model(checkpoint, synthetic, tmp_path):
    """`--quantization int8`: the answers are those of the checkpoint loaded with quant_method unimoe_int8."""
    model, processor = load_model_and_processor(str(checkpoint), device="cpu", quantization="int8")
    assert type(model.lm_head).__name__ == "UniMoEInt8Linear"
    rows = synthetic["rows"][::4]
    expected = greedy_answers(model, processor, rows, synthetic["root"])
    data = write_json(synthetic["root"] / "eval_int8.json", rows)
    lines, _ = run_cli(checkpoint, data, "vqa", tmp_path / "out", "--quantization", "int8")
    assert [line["prediction"] for line in lines] == expected
    # a saved int8 checkpoint loads as int8 with the flag or without it
    saved = tmp_path / "int8"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    for flag in ([], ["--quantization", "int8"]):
        lines, _ = run_cli(saved, data, "vqa", tmp_path / f"saved{len(flag)}", *flag)
        assert [line["prediction"] for line in lines] == expected
    with pytest.raises(ValueError, match=r"^--quantization 'int4': expected one of none, int8$"):
        run_cli(checkpoint, data, "vqa", tmp_path / "bad", "--quantization", "int4")


def test_experts_implementation_picks_the_experts_kernel(checkpoint, synthetic, tmp_path):
    """`--experts_implementation eager`: the answers are those of the checkpoint loaded with that kernel; an unknown
    kernel is refused naming the choices, before anything loads."""
    model, processor = load_model_and_processor(str(checkpoint), device="cpu", experts_implementation="eager")
    assert model.config.get_text_config()._experts_implementation == "eager"
    default, _ = load_model_and_processor(str(checkpoint), device="cpu")
    assert default.config.get_text_config()._experts_implementation != "eager"
    rows = synthetic["rows"][::4]
    expected = greedy_answers(model, processor, rows, synthetic["root"])
    data = write_json(synthetic["root"] / "eval_eager.json", rows)
    lines, _ = run_cli(checkpoint, data, "vqa", tmp_path / "out", "--experts_implementation", "eager")
    assert [line["prediction"] for line in lines] == expected
    choices = "default, eager, grouped_mm, batched_mm"
    with pytest.raises(ValueError, match=rf"^--experts_implementation 'fast': expected one of {choices}$"):
        run_cli(checkpoint, data, "vqa", tmp_path / "bad", "--experts_implementation", "fast")
    with pytest.raises(ValueError, match=r"^--experts_implementation eager does not apply with --quantization int8"):
        run_cli(checkpoint, data, "vqa", tmp_path / "bad", "--experts_implementation", "eager", "--quantization", "int8")


def test_system_prompt_option_sets_the_system_message_of_rows_without_one(tmp_path):
    rows = [{"id": "q-1", "text": "Say red.", "gt": "red"},
            {"id": "q-2", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "hi"}]}]
    data = write_json(tmp_path / "rows.json", rows)
    default, empty = load_eval_samples(data, "vqa"), load_eval_samples(data, "vqa", system_prompt="")
    assert [message["role"] for message in default[0].messages] == ["user"]  # the chat template's default applies
    assert empty[0].messages[0] == {"role": "system", "content": ""}
    assert empty[1].messages[0] == {"role": "system", "content": "Be brief."} == default[1].messages[0]
    assert empty[0].prompt == default[0].prompt


def test_caption_task_through_the_command_line_with_jsonl(checkpoint, synthetic, single_answers, tmp_path):
    rows = [dict(row) for row in synthetic["rows"][:4]]
    # two references each; for rows 0 and 2 one of them is the model's own answer
    for i, row in enumerate(rows):
        row["references"] = [single_answers[i] if i % 2 == 0 else "a red circle", "a shape on a plain background"]
    data = synthetic["root"] / "captions_scored.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "trl_scripts.evaluate", "--model", str(checkpoint), "--data", str(data),
               "--task", "caption", "--batch_size", "3", "--max_new_tokens", str(MAX_NEW_TOKENS),
               "--output_dir", str(output_dir), "--dataset_name", "Synthetic captions", "--dataset_split", "validation"]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "caption on Synthetic captions (4 samples): bleu" in completed.stdout

    lines, result = read_outputs(output_dir)
    assert [line["prediction"] for line in lines] == single_answers[:4]
    assert [line["references"] for line in lines] == [row["references"] for row in rows]
    assert result["dataset"] == {"name": "Synthetic captions", "type": "Synthetic captions", "split": "validation"}
    streams = [[line["references"][k] for line in lines] for k in range(2)]
    expected = sacrebleu.BLEU(effective_order=True).corpus_score([line["prediction"] for line in lines], streams).score
    assert result["metrics"] == {"bleu": pytest.approx(expected)}
    assert expected > 0


def word_edits(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance between two word lists."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, start=1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1]


def test_asr_task(checkpoint, synthetic, single_answers, tmp_path):
    indices = [i for i, row in enumerate(synthetic["rows"]) if row["modality"] in ("speech", "audio")][:3]
    rows = [synthetic["rows"][i] for i in indices]
    rows[0] = with_answer(rows[0], f"{single_answers[indices[0]]} extra words")  # two deletions
    data = synthetic["root"] / "asr.json"
    data.write_text(json.dumps(rows))

    lines, result = run_cli(checkpoint, data, "asr", tmp_path / "out", "--group_by", "none")

    assert [line["prediction"] for line in lines] == [single_answers[i] for i in indices]
    assert all("group" not in line for line in lines)
    words = [[squad_normalise(text).split() for text in (line["references"][0], line["prediction"])] for line in lines]
    expected = sum(word_edits(ref, hyp) for ref, hyp in words) / sum(len(ref) for ref, _ in words)
    assert result["metrics"]["wer"] == pytest.approx(expected)
    assert set(result["metrics"]) == {"wer", "cer"}


# ------------------------------------------------------------------------------------- the original Uni-MoE format


INSTRUCTION = "\nAnswer the question using a single word or phrase."


def original_media(synthetic, media_root):
    """Media laid out as the original files name them: /coco_images/..., /speech/..., a video as frame images."""
    (media_root / "coco_images").mkdir(parents=True)
    (media_root / "speech").mkdir()
    (media_root / "frames").mkdir()
    shutil.copy(
        synthetic["root"] / "media/images/eval-00000.png", media_root / "coco_images/COCO_val2014_000000461751.png"
    )
    shutil.copy(synthetic["root"] / "media/speech/eval-00000.wav", media_root / "speech/digit.wav")
    for index in range(4):
        Image.new("RGB", (32, 32), (60 * index, 0, 0)).save(media_root / f"frames/{index}.png")


def aokvqa_row(question_id, media_key, media, placeholder, question, gt):
    value = f"{placeholder}\n{question}{INSTRUCTION}"
    return {"question_id": question_id, media_key: media, "text": question + INSTRUCTION, "category": "default",
            "gt": gt, "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": ""}]}  # fmt: skip


def test_original_format_file_end_to_end_with_ten_references(checkpoint, synthetic, tmp_path):
    media_root = tmp_path / "media"
    original_media(synthetic, media_root)
    frames = [f"/frames/{index}.png" for index in range(4)]
    rows = [
        aokvqa_row("22jbM6gDxdaMaunuzgrsBB", "image", "/coco_images/COCO_val2014_000000461751.png", "<image>", "What colour is the shape?", ["zzz"] * 10),
        aokvqa_row("speech-1", "voice", ["/speech/digit.wav"], "<audio>", "What did the speaker say?", ["zzz"] * 10),
        aokvqa_row("video-1", "video", frames, "<video>", "Which way does the object move?", "zzz"),
    ]  # fmt: skip
    data = tmp_path / "aokvqa.json"
    data.write_text(json.dumps(rows, indent=4))
    first, _ = run_cli(checkpoint, data, "vqa", tmp_path / "first", "--media_root", media_root, "--batch_size", 2)
    answers = [line["prediction"] for line in first]

    # 3 of 10 humans gave the model's answer to the image question, 1 of 10 to the speech one
    rows[0]["gt"] = [answers[0]] * 3 + ["zzz"] * 7
    rows[1]["gt"] = [answers[1]] + ["zzz"] * 9
    data.write_text(json.dumps(rows, indent=4))
    lines, result = run_cli(checkpoint, data, "vqa", tmp_path / "second", "--media_root", media_root, "--batch_size", 2)

    assert [line["prediction"] for line in lines] == answers
    assert [line["id"] for line in lines] == ["22jbM6gDxdaMaunuzgrsBB", "speech-1", "video-1"]
    assert [line["group"] for line in lines] == ["image", "audio", "video"]  # from the media the rows use
    assert lines[2]["references"] == ["zzz"]
    metrics = result["metrics"]
    # leave-one-out over 10 answers: 3 matches -> (3 * 2/3 + 7 * 1) / 10 = 0.9; 1 match -> 9 * (1/3) / 10 = 0.3
    assert metrics["vqa_accuracy/image"] == pytest.approx(0.9)
    assert metrics["vqa_accuracy/audio"] == pytest.approx(0.3)
    assert metrics["vqa_accuracy/video"] == 0.0
    assert metrics["vqa_accuracy"] == pytest.approx(1.2 / 3)
    # exact match takes any of the references
    assert metrics["exact_match"] == pytest.approx(2 / 3)


def mmbench_row(index, answer):
    question = (
        "Hint: Look at the shape.\nLook at the image and select the correct answer to the following question:\n"
        "What colour is the shape?\nOptions:\nA.red\nB.green\nC.blue" + INSTRUCTION
    )
    return {"id": f"MMBench1.1-{index}", "image": [f"MMBench1.1/{index}.jpg"], "category": ["attribute_reasoning"],
            "answer": [answer], "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": ""}]}  # fmt: skip


def test_original_mmbench_rows_get_placeholders_and_options(checkpoint, synthetic, tmp_path):
    (tmp_path / "MMBench1.1").mkdir()
    for index in (241, 252):
        Image.open(synthetic["root"] / "media/images/eval-00001.png").convert("RGB").save(
            tmp_path / f"MMBench1.1/{index}.jpg"
        )
    data = tmp_path / "MMBench1.1.json"
    data.write_text(json.dumps([mmbench_row(241, "B"), mmbench_row(252, "A")]))

    samples = load_eval_samples(data, "mcq")
    # MMBench's text has no <image>: it is put before the question, as the original inference did
    assert samples[0].prompt.startswith("<image>\nHint: Look at the shape.")
    assert samples[0].messages[0]["content"][0] == {"type": "image", "path": str(tmp_path / "MMBench1.1/241.jpg")}
    assert samples[0].options == {"A": "red", "B": "green", "C": "blue"}
    assert [sample.references for sample in samples] == [["B"], ["A"]]
    assert [sample.group for sample in samples] == ["image", "image"]  # no `modality` field: the media decide

    lines, result = run_cli(checkpoint, data, "mcq", tmp_path / "out", "--batch_size", 2)
    assert [line["options"] for line in lines] == [{"A": "red", "B": "green", "C": "blue"}] * 2
    recomputed = load_metric("mcq_accuracy", keep_in_memory=True).compute(
        predictions=[line["prediction"] for line in lines],
        references=[line["references"] for line in lines],
        options=[line["options"] for line in lines],
    )
    assert result["metrics"] == pytest.approx(recomputed)
    assert set(result["metrics"]) == {"mcq_accuracy", "mcq_unparsed"}


def test_other_row_formats(synthetic, tmp_path):
    shutil.copy(synthetic["root"] / "media/images/eval-00000.png", tmp_path / "red.png")
    rows = [
        {"id": "chat", "modality": "image", "messages": [
            {"role": "user", "content": [{"type": "image", "path": "red.png"}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]},
        # a LLaVA question-file row: the question in `text`, VQA-style answer dicts
        {"question_id": 7, "image": "red.png", "text": "Which shape?", "modality": "image",
         "answers": [{"answer": "circle", "answer_id": 1}, {"answer": "disc", "answer_id": 2}]},
        {"id": "text-only", "modality": "text", "conversations": [
            {"from": "human", "value": "Say red."}, {"from": "gpt", "value": "red"}], "references": ["red", "Red!"]},
    ]  # fmt: skip
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    samples = load_eval_samples(data, "vqa")
    assert [sample.id for sample in samples] == ["chat", "7", "text-only"]
    assert [sample.references for sample in samples] == [["red"], ["circle", "disc"], ["red", "Red!"]]
    assert [sample.prompt for sample in samples] == ["<image>\nWhat colour?", "<image>\nWhich shape?", "Say red."]
    assert samples[0].messages == [{"role": "user", "content": [
        {"type": "image", "path": str(tmp_path / "red.png")}, {"type": "text", "text": "What colour?"}]}]  # fmt: skip
    assert [sample.group for sample in samples] == ["image", "image", "text"]
    assert len(load_eval_samples(data, "vqa", max_samples=2)) == 2


# ------------------------------------------------------------------------------------------------------ bad input


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def test_bad_rows_fail_before_the_model_loads(synthetic, tmp_path):
    good = synthetic["rows"][0]
    missing_model = str(tmp_path / "no-such-model")  # never reached: the data is checked first

    data = write_json(tmp_path / "missing_media.json", [good, {**good, "id": "q-7", "image": "media/images/nope.png"}])
    with pytest.raises(FileNotFoundError, match=r"row q-7: image file 'media/images/nope.png' not found .*nope.png"):
        main(["--model", missing_model, "--data", str(data), "--task", "vqa", "--media_root", str(synthetic["root"])])

    okvqa = {"question_id": 2971475, "image": "/coco_images/x.jpg", "text": "What sport?", "conversations": [
        {"from": "human", "value": "<image>\nWhat sport?"}, {"from": "gpt", "value": ""}]}  # fmt: skip
    shutil.copy(synthetic["root"] / "media/images/eval-00000.png", tmp_path / "x.jpg")
    (tmp_path / "coco_images").mkdir()
    shutil.copy(tmp_path / "x.jpg", tmp_path / "coco_images/x.jpg")
    data = write_json(tmp_path / "okvqa.json", [okvqa])
    with pytest.raises(ValueError, match=r"row 2971475 in .*okvqa.json: no reference answer"):
        main(["--model", missing_model, "--data", str(data), "--task", "vqa"])
    with pytest.raises(ValueError, match=r"row 2971475 .*no reference answer"):
        load_eval_samples(write_json(tmp_path / "empty_gt.json", [{**okvqa, "gt": []}]), "vqa")

    with pytest.raises(ValueError, match=r"row 2971475 .*the asr task takes one reference transcript, got 2"):
        load_eval_samples(write_json(tmp_path / "two.json", [{**okvqa, "gt": ["a", "b"]}]), "asr")

    with pytest.raises(ValueError, match=r"row 2971475: more <image> placeholders than image paths"):
        two_images = {**okvqa, "gt": "a", "conversations": [{"from": "human", "value": "<image><image>\nWhat?"}]}
        load_eval_samples(write_json(tmp_path / "placeholders.json", [two_images]), "vqa")

    with pytest.raises(ValueError, match=r"rows \['b'\] have no 'split_name' field"):
        rows = [{**good, "id": "a", "split_name": "x"}, {**good, "id": "b"}]
        load_eval_samples(write_json(synthetic["root"] / "partial_groups.json", rows), "vqa", group_by="split_name")

    (tmp_path / "broken.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl: line 2 is not valid JSON"):
        load_eval_samples(tmp_path / "broken.jsonl", "vqa")
    with pytest.raises(ValueError, match="expected a JSON list of rows"):
        load_eval_samples(write_json(tmp_path / "object.json", {"data": []}), "vqa")
    with pytest.raises(ValueError, match="row q: no prompt"):
        load_eval_samples(write_json(tmp_path / "no_prompt.json", [{"id": "q", "gt": "a"}]), "vqa")


# ------------------------------------------------------------------------------- review: options and references


def test_options_and_the_checkpoint_are_checked_naming_them(tmp_path, monkeypatch):
    import torch

    data = write_json(tmp_path / "rows.json", [{"id": "q-1", "text": "Say red.", "gt": "red"}, {"id": "q-2", "text": "Hi", "gt": "hi"}])
    checkpoint_folder = tmp_path / "checkpoint"
    checkpoint_folder.mkdir()

    def evaluate(*options, model=str(checkpoint_folder)):
        main(["--model", model, "--data", str(data), "--task", "vqa", "--output_dir", str(tmp_path / "out"), *options])

    # a missing folder (an OSError traceback from transformers), a folder that is not a checkpoint
    with pytest.raises(FileNotFoundError, match=rf"^--model '.*nope': no such folder \({re.escape(str(tmp_path))}/nope\)"):
        evaluate(model=str(tmp_path / "nope"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileNotFoundError, match=r"^--model 'out/nope': no such folder .*; expected a checkpoint folder"):
        evaluate(model="out/nope")  # out/ exists: a local folder was meant, not a Hub id
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries against the real Hub
    with pytest.raises(FileNotFoundError, match=r"^--model 'org/nope': no such folder .*, and not loadable as a Hub model id"):
        evaluate(model="org/nope")
    with pytest.raises(FileNotFoundError, match=r"^--model '.*checkpoint': .*checkpoint is not a checkpoint: it has no config\.json"):
        evaluate()
    # --max_samples -1 silently dropped the last row
    for value in ("-1", "0"):
        with pytest.raises(ValueError, match=rf"^--max_samples must be at least 1 \(the number of rows to evaluate\), got {value}$"):
            evaluate("--max_samples", value)
    with pytest.raises(ValueError, match=r"^max_samples must be at least 1"):
        load_eval_samples(data, "vqa", max_samples=-1)
    # a device this torch does not have (an AssertionError traceback from torch's CUDA lazy init)
    with pytest.raises(ValueError, match=r"^--device 'gpu' is not a device name \(e\.g\. cpu, cuda, cuda:1\)"):
        evaluate("--device", "gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^--device 'cuda' is not available: .*; available: cpu"):
            evaluate("--device", "cuda")
    else:
        with pytest.raises(ValueError, match=r"^--device 'cuda:99' is not available: no such device here; available: cpu, cuda:0"):
            evaluate("--device", "cuda:99")


@pytest.mark.parametrize(
    "row, task, message",
    [
        ({"gt": {"label": "x"}}, "vqa", r"^row q-1: reference field 'gt' must be a string or a list of strings .*, got dict \{\"label\": \"x\"\}"),
        ({"answers": ["a", 3]}, "vqa", r"^row q-1: reference field 'answers' must be .*, got int 3"),
        ({"answers": [{"answer": ["a"]}]}, "vqa", r"^row q-1: reference field 'answers' must be .*, got dict"),
        ({"gt": "Z", "options": ["a cat", "a dog"]}, "mcq", r"^row q-1 in .*rows\.json: the reference 'Z' is not one of the row's options \(A, B\)"),
        ({"gt": ["B", "a bird"], "options": ["a cat", "a dog"]}, "mcq", r"^row q-1 .*the reference 'a bird' is not one of the row's options"),
        ({"text": 5}, "vqa", r"^row q-1: the prompt 'text' must be a string, got int 5$"),
        ({"text": "  "}, "vqa", r"^row q-1: the prompt 'text' is empty$"),
        ({"text": None, "conversations": "Hi"}, "vqa", r"^row q-1: 'conversations' must be a list of turns"),
        ({"conversations": [{"from": "gpt", "value": "a"}]}, "vqa", r"^row q-1: the conversation has no question \(no user turn before the answer\)$"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "vqa", r"^row q-1: the conversation has no question \(no user turn before the answer\)$"),
    ],
    ids=["dict gt", "number in a list", "answer not a string", "mcq letter not an option", "mcq text not an option",
         "number text", "blank text", "conversations not a list", "answer only", "messages answer only"],
)
def test_references_and_prompts_that_cannot_be_right_are_refused(tmp_path, row, task, message):
    data = write_json(tmp_path / "rows.json", [{"id": "q-1", "text": "Which animal?", "gt": "a", **row}])
    with pytest.raises(ValueError, match=message):
        load_eval_samples(data, task)


@pytest.mark.parametrize(
    "conversation",
    [
        "Hi",
        [{"from": "human"}],
        [{"from": "Human", "value": "Hi"}],
        [{"value": "Hi"}],
        [{"from": "human", "value": 5}],
        ["Hi"],
        [{"from": "human", "value": "Hi"}, {"from": "system", "value": "Be terse."}],
        [{"from": "human", "value": "<image>\n<image>\nHi"}],
    ],
    ids=["not a list", "no value", "speaker case", "no speaker", "number value", "turn not a dict", "late system",
         "more placeholders than media"],
)
def test_a_bad_conversation_is_refused_with_the_training_parsers_own_error(tmp_path, conversation):
    """Evaluation reads `conversations` rows with training's parser (`to_messages`): the same rows are refused, with
    the same error naming the row and the turn."""
    row = {"id": "q-1", "image": "red.png", "gt": "a", "conversations": conversation}
    with pytest.raises(ValueError) as training:
        to_messages(row)
    with pytest.raises(ValueError) as evaluation:
        load_eval_samples(write_json(tmp_path / "rows.json", [row]), "vqa")
    assert str(evaluation.value) == str(training.value)
    assert str(evaluation.value).startswith("row q-1")


def test_mcq_references_may_be_an_option_letter_or_text(tmp_path):
    rows = [{"id": "q-1", "text": "Which animal?", "gt": "B", "options": ["a cat", "a dog"]},
            {"id": "q-2", "text": "Which animal?", "gt": ["a dog"], "options": {"A": "a cat", "B": "a dog"}},
            {"id": "q-3", "text": "Which?", "gt": "Z"},  # options unknown: any letter or text
            {"id": "q-4", "text": "Which?", "answers": [{"answer": "B", "answer_id": 1}, "b"], "options": ["x", "y"]}]  # fmt: skip
    samples = load_eval_samples(write_json(tmp_path / "rows.json", rows), "mcq")
    assert [sample.references for sample in samples] == [["B"], ["a dog"], ["Z"], ["B", "b"]]


def test_a_text_only_checkpoint_loads_with_a_processor_built_from_its_tokenizer(tmp_path):
    """The flat text-only layout ships a tokenizer only (`unimoe-upcycle`): the processor is built from it and its chat
    template; a tokenizer without a template is a clear error."""
    from modeling_unimoe import UniMoEProcessor, UniMoETextForCausalLM
    from trl_scripts import load_preset
    from trl_scripts.training.presets import CHAT_TEMPLATE_PATH

    UniMoETextForCausalLM(load_preset("tiny", text_only=True).text_config).save_pretrained(tmp_path)
    tokenizer = load_tiny_processor().tokenizer
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has a tokenizer but no processor and no chat template to build one from"):
        load_model_and_processor(str(tmp_path))
    tokenizer.chat_template = CHAT_TEMPLATE_PATH.read_text()
    tokenizer.save_pretrained(tmp_path)
    model, processor = load_model_and_processor(str(tmp_path))
    assert type(model).__name__ == "UniMoETextForCausalLM" and isinstance(processor, UniMoEProcessor)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    expected = load_tiny_processor(load_preset("tiny", text_only=True)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert inputs["input_ids"].tolist() == expected["input_ids"].tolist()


@pytest.mark.parametrize(
    "name, content",
    [
        ("list.json", '[{"id": "a",\n "conversations": }]'),
        ("lines.jsonl", '{"id": "a"}\n{"id": \n'),
        ("mixed.json", '[{"id": "a"}, 3]'),
        ("empty.json", "[]"),
        ("blank.jsonl", "\n  \n"),
    ],
)
def test_a_bad_data_file_gets_the_training_readers_own_error(tmp_path, name, content):
    """Evaluation reads data files with the training data's reader (`read_json_rows`): the same file, the same error."""
    from trl_scripts.training.data import load_conversations

    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as training:
        load_conversations(str(path))
    with pytest.raises(ValueError) as evaluation:
        load_eval_samples(path, "vqa")
    assert str(evaluation.value) == str(training.value)
