"""The packaged `evaluate` metric modules against hand-computed values, normalisation edge cases included."""

import math
import sys

import pytest

from trl_scripts.evaluation.metrics import available_metrics, load_metric


@pytest.fixture(scope="module")
def metrics():
    return {name: load_metric(name, keep_in_memory=True) for name in available_metrics()}


def module_of(metric):
    """The namespace of a loaded metric script (for its helper functions)."""
    return sys.modules[type(metric).__module__]


def test_available_metrics_and_unknown_name():
    assert available_metrics() == ["bleu", "exact_match", "mcq_accuracy", "vqa_accuracy", "wer"]
    with pytest.raises(ValueError, match=r"no metric 'accuracy'.*'exact_match'"):
        load_metric("accuracy")


def test_results_are_plain_floats(metrics):
    results = [
        metrics["exact_match"].compute(predictions=["a"], references=["a"], groups=["x"]),
        metrics["vqa_accuracy"].compute(predictions=["a"], references=[["a", "b"]]),
        metrics["mcq_accuracy"].compute(predictions=["A"], references=["A"]),
        metrics["bleu"].compute(predictions=["a b c d"], references=[["a b c d"]]),
        metrics["wer"].compute(predictions=["a b"], references=["a b"]),
    ]
    for result in results:
        assert all(type(value) is float for value in result.values()), result


# ------------------------------------------------------------------------------------------------------ exact match


def test_exact_match_normalisation_and_several_references(metrics):
    result = metrics["exact_match"].compute(
        predictions=["The  Cat.", "an apple!", "dog", "Red"],
        references=[["cat", "kitten"], "apple", "bird", ["blue", "  red "]],
    )
    assert result == {"exact_match": 0.75}
    raw = metrics["exact_match"].compute(predictions=["The Cat.", " cat "], references=["cat", "cat"], normalize=False)
    assert raw == {"exact_match": 0.5}


def test_exact_match_per_group(metrics):
    result = metrics["exact_match"].compute(
        predictions=["red", "blue", "one", "two", "three"],
        references=["red", "red", "one", "two", "four"],
        groups=["image", "image", "audio", "audio", "audio"],
    )
    assert result["exact_match"] == pytest.approx(3 / 5)
    assert result["exact_match/image"] == pytest.approx(1 / 2)
    assert result["exact_match/audio"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 groups for 3 predictions"):
        metrics["exact_match"].compute(predictions=["a", "b", "c"], references=["a", "b", "c"], groups=["x", "y"])


# ----------------------------------------------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize(
    "answer, normalised",
    [
        ("Two.", "2"),  # number word, trailing period
        ("The Dog", "dog"),  # article, case
        ("a red ball", "red ball"),
        ("dont", "don't"),  # contractions restored
        ("isnt it", "isn't it"),
        ("couldnt've", "couldn't've"),
        ("yes!", "yes"),
        ("t-shirt", "t shirt"),  # punctuation inside a word splits it
        ("black - white", "black white"),  # next to a space it is dropped
        ("1,000", "1000"),  # digit,digit: every mark is dropped
        ("3.5", "3.5"),  # a period before a digit stays
        ("none", "0"),
        ("  left\nside\t", "left side"),
        ("what's up?", "what's up"),
    ],
)
def test_vqa_answer_normalisation(metrics, answer, normalised):
    assert module_of(metrics["vqa_accuracy"]).normalize_vqa_answer(answer) == normalised


def test_vqa_accuracy_ten_references(metrics):
    vqa = metrics["vqa_accuracy"]
    two_cats = ["cat"] * 2 + ["dog"] * 8
    # each of the 10 leave-one-out subsets: min(1, matches / 3)
    # "cat": the 2 subsets without a cat hold 1 cat (1/3), the 8 others 2 cats (2/3): (2/3 + 16/3) / 10 = 0.6
    assert vqa.compute(predictions=["cat"], references=[two_cats])["vqa_accuracy"] == pytest.approx(0.6)
    # "dog": every subset still holds at least 7 dogs
    assert vqa.compute(predictions=["Dog."], references=[two_cats])["vqa_accuracy"] == pytest.approx(1.0)
    # 3 cats: 3 subsets with 2 cats (2/3), 7 with 3 (1): (2 + 7) / 10 = 0.9
    assert vqa.compute(predictions=["cat"], references=[["cat"] * 3 + ["dog"] * 7])["vqa_accuracy"] == pytest.approx(
        0.9
    )
    # 1 cat: the subset without it has 0, the 9 others 1/3: 0.3
    assert vqa.compute(predictions=["a cat"], references=[["cat"] + ["dog"] * 9])["vqa_accuracy"] == pytest.approx(0.3)
    assert vqa.compute(predictions=["bird"], references=[two_cats])["vqa_accuracy"] == 0.0
    # references are normalised too: "Two" and "2" are the same answer
    assert vqa.compute(predictions=["2"], references=[["Two"] * 3 + ["three"] * 7])["vqa_accuracy"] == pytest.approx(
        0.9
    )


def test_vqa_accuracy_single_reference_mean_and_groups(metrics):
    result = metrics["vqa_accuracy"].compute(
        predictions=["cat", "Two", "a dog", "yes"],
        references=[["cat"] * 2 + ["dog"] * 8, "2", ["dog"], "no"],
        groups=["image", "image", "video", "video"],
    )
    assert result["vqa_accuracy"] == pytest.approx((0.6 + 1.0 + 1.0 + 0.0) / 4)
    assert result["vqa_accuracy/image"] == pytest.approx(0.8)
    assert result["vqa_accuracy/video"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- multiple choice


OPTIONS = {"A": "a seed", "B": "a leaf", "C": "red", "D": "dark red"}


@pytest.mark.parametrize(
    "prediction, options, choice",
    [
        ("B", None, "B"),
        ("(c)", None, "C"),
        ("[D].", None, "D"),
        ("B. a leaf", None, "B"),
        ("(C) red, because it is ripe", None, "C"),
        ("The answer is (B).", None, "B"),
        ("Answer: C", None, "C"),
        ("I believe the correct option is D since it is darker.", None, "D"),
        ("a seed", OPTIONS, "A"),
        ("It is a leaf.", OPTIONS, "B"),
        ("dark red", OPTIONS, "D"),  # "red" is inside the longer matched option
        ("I think B", None, "B"),
        ("A dog is running", None, None),  # the article, not option A
        ("B or C", None, None),  # ambiguous
        ("E", OPTIONS, None),  # not one of the options
        ("", None, None),
        ("no idea", OPTIONS, None),
    ],
)
def test_mcq_choice_extraction(metrics, prediction, options, choice):
    assert module_of(metrics["mcq_accuracy"]).extract_choice(prediction, options) == choice


def test_mcq_accuracy(metrics):
    result = metrics["mcq_accuracy"].compute(
        predictions=["The answer is B.", "a seed", "(C)", "no idea", "It is a leaf"],
        references=["B", "A", ["D", "C"], "A", "a leaf"],  # a reference may be an option's text
        options=[None, ["a seed", "a leaf"], None, None, OPTIONS],
        groups=["image", "image", "video", "video", "video"],
    )
    assert result == {
        "mcq_accuracy": pytest.approx(4 / 5),
        "mcq_accuracy/image": 1.0,
        "mcq_accuracy/video": pytest.approx(2 / 3),
        "mcq_unparsed": pytest.approx(1 / 5),
    }


# ------------------------------------------------------------------------------------------------------------- BLEU


def test_bleu_hand_computed(metrics):
    bleu = metrics["bleu"]
    assert bleu.compute(predictions=["a red circle"], references=[["a red circle"]])["bleu"] == pytest.approx(100.0)
    # every n-gram matches; only the brevity penalty: hypothesis 4 words, reference 6 -> exp(1 - 6/4)
    assert bleu.compute(predictions=["a b c d"], references=["a b c d e f"])["bleu"] == pytest.approx(
        100 * math.exp(-0.5)
    )
    # several references, a different number per caption: the closest reference length counts (5 and 4, hyp 4 + 4)
    score = bleu.compute(predictions=["a b c d", "e f g h"], references=[["a b c d e f", "a b c d x"], ["e f g h"]])
    assert score["bleu"] == pytest.approx(100 * math.exp(1 - 9 / 8))
    # unigram precision 3/4, bigram 1/3, trigram and 4-gram 0 (smoothed by sacrebleu's exp method: 1/2, 1/4 of 2 and 1)
    score = bleu.compute(predictions=["a b x c"], references=["a b y c"])["bleu"]
    assert score == pytest.approx(
        100 * math.exp((math.log(3 / 4) + math.log(1 / 3) + math.log(1 / 4) + math.log(1 / 4)) / 4)
    )


# -------------------------------------------------------------------------------------------------------- WER / CER


def test_wer_and_cer_hand_computed(metrics):
    wer = metrics["wer"]
    # one deletion ("down") and one insertion ("there") over 6 reference words
    result = wer.compute(
        predictions=["the cat sat", "hello there world"], references=["The cat, sat down.", "hello world"]
    )
    assert result["wer"] == pytest.approx(2 / 6)
    # characters: "the cat sat" vs "the cat sat down" (5 deletions) and 6 insertions ("there ") over 16 + 11 characters
    assert result["cer"] == pytest.approx(11 / 27)
    assert wer.compute(predictions=["abed"], references=["abcd"])["cer"] == pytest.approx(1 / 4)
    raw = wer.compute(predictions=["the cat"], references=["The cat."], normalize=False)
    assert raw["wer"] == pytest.approx(1.0)  # "the" != "The", "cat" != "cat."
    with pytest.raises(ValueError, match="sample 1 has an empty reference transcript after normalisation"):
        wer.compute(predictions=["a", "b"], references=["a", "?!"])
