"""Publishing to the Hub: `python -m trl_scripts.push_to_hub`, plain `model.push_to_hub` / `processor.push_to_hub` and a
peft adapter, against the Hub-compatible endpoint of `local_hub.py` on 127.0.0.1; the published repositories are
loaded back in fresh processes (our packages unimportable there) through `from_pretrained("org/name")`."""

import json
import os
import re
import subprocess
import sys
import textwrap

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import RepositoryNotFoundError
from peft import LoraConfig, get_peft_model

from modeling_unimoe import UniMoEForCausalLM, UniMoETextForCausalLM
from tests.utils import REPO_ROOT
from tests.utils.local_hub import LocalHub
from tests.utils.media import write_audio, write_image, write_video
from tests.utils.models import make_tiny_model, random_ids
from tests.utils.processes import run_fresh_python
from trl_scripts import load_preset, load_tiny_processor
from trl_scripts.loading import load_processor
from trl_scripts.hub.model_card import build_model_card, load_eval_result
from trl_scripts.hub.push_to_hub import check_model_folder, push_folder_to_hub
from trl_scripts.hub.space import write_space


TOKEN = "hf_local_test_token"
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CODE_FILES = {
    "configuration_unimoe.py", "configuration_beats.py", "modeling_unimoe.py", "modeling_beats.py",
    "pipeline_unimoe.py", "processing_unimoe.py", "feature_extraction_unimoe.py", "feature_extraction_beats.py",
    "transformers_compat.py", "quantization_unimoe.py",
}
PROCESSOR_FILES = {"processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors"}


@pytest.fixture(scope="module")
def hub():
    with LocalHub(tokens={TOKEN}) as server:
        yield server


def hub_env(hub: LocalHub, tmp_path, token: str | None = TOKEN) -> dict:
    """Environment of a process that talks to the local hub: endpoint, private HF_HOME, token (or none at all)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("HF_")}
    env |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home_push"), "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO_ROOT)}
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trl_scripts.push_to_hub", *args], cwd=REPO_ROOT, env=env, capture_output=True,
        text=True, timeout=300,
    )


def run_with_package(code: str, env: dict, tmp_path) -> str:
    """A fresh process that imports our packages (the publishing side), talking to the local hub."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"process failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture
def online(monkeypatch):
    """Lets this process talk to the local hub (conftest makes the test session offline)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub_client_env(hub, monkeypatch):
    """For `run_fresh_python` (which forces HF_HUB_OFFLINE=1): the hub endpoint and token; the code re-enables HTTP."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def run_hub_client(code: str, tmp_path) -> str:
    """A Hub user's fresh process (our packages unimportable) reading from the local hub."""
    online = 'import os\nos.environ["HF_HUB_OFFLINE"] = "0"  # the local hub is the only endpoint\n'
    return run_fresh_python(online + textwrap.dedent(code), tmp_path)


def save_multimodal(folder, seed: int = 0):
    """A tiny multimodal checkpoint. Its reloaded logits match to 1e-5, not bit for bit: weights read from
    safetensors can sit at other memory alignments than freshly built ones, which changes the last float bits."""
    model, processor = make_tiny_model(seed=seed, text_only=False), load_tiny_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def write_eval_result(path, task="vqa", name="Synthetic VQA", metrics=None, **overrides):
    result = {"task": task, "dataset": {"name": name, "type": f"synthetic-{task}", "split": "test"},
              "metrics": metrics or {"accuracy": 0.75}, **overrides}
    path.write_text(json.dumps(result))
    return path


def write_media(folder):
    write_image(folder / "image.png", color=(0, 0, 255))
    write_video(folder / "video.mp4")
    write_audio(folder / "audio.wav", seconds=1.0)


def usage_code(readme: str) -> str:
    return re.search(r"```python\n(.*?)```", readme, re.S).group(1)


def test_cli_publishes_checkpoint_with_card_and_fresh_process_loads_it(hub, hub_client_env, online, tmp_path):
    folder = tmp_path / "stage3"
    model, processor = save_multimodal(folder)
    write_image(folder / "routing_heatmap.png", size=(16, 8))  # what the quickstart leaves in the folder
    write_eval_result(folder / "eval_results_vqa.json")
    extra = write_eval_result(tmp_path / "mcq.json", task="mcq", name="Synthetic MCQ", metrics={"accuracy": 0.5})
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "optimizer.pt").write_bytes(b"\x80 pickle")
    (folder / "training_args.bin").write_bytes(b"\x80 pickle")
    (folder / "README.md").write_text("stale card")

    result = run_cli(
        ["--model", str(folder), "--repo-id", "org/tiny-unimoe", "--private", "--eval_results", str(extra),
         "--base_model", BASE_MODEL, "--datasets", "synthetic-instructions"],
        hub_env(hub, tmp_path),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Pushed" in result.stdout and "org/tiny-unimoe" in result.stdout

    repo = hub.repo("org/tiny-unimoe")
    assert repo.private
    assert HfApi(endpoint=hub.url, token=TOKEN).model_info("org/tiny-unimoe").private
    with pytest.raises(RepositoryNotFoundError):  # invisible without a token
        HfApi(endpoint=hub.url, token=False).model_info("org/tiny-unimoe")
    assert set(repo.files) == MODEL_FILES | CODE_FILES | PROCESSOR_FILES | {
        ".gitattributes", "README.md", "routing_heatmap.png", "eval_results_vqa.json"}
    assert [c.title for c in repo.commits] == ["initial commit", "Upload Uni-MoE model with model card"]
    assert json.loads(repo.files["config.json"])["auto_map"]["AutoModelForCausalLM"] == "modeling_unimoe.UniMoEForCausalLM"
    assert repo.files["model.safetensors"] == (folder / "model.safetensors").read_bytes()

    card = ModelCard(repo.files["README.md"].decode())
    assert card.data.license == "apache-2.0"
    assert card.data.base_model == [BASE_MODEL]
    assert card.data.pipeline_tag == "any-to-any"
    assert card.data.library_name == "transformers"
    assert {"uni-moe", "mixture-of-experts", "multimodal", "vision", "speech", "audio"} <= set(card.data.tags)
    assert card.data.datasets == ["synthetic-instructions"]
    results = {(r.task_type, r.dataset_name, r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {
        ("visual-question-answering", "Synthetic VQA", "test", "accuracy"): 0.75,
        ("multiple-choice", "Synthetic MCQ", "test", "accuracy"): 0.5,
    }
    total, active = model.num_parameters(), model.num_active_parameters()
    assert active < total
    assert f"{active:,} of {total:,}" in card.text
    assert "| Experts | 4 routed per sparse layer" in card.text and "| Top-k | 2 experts per token" in card.text
    assert "| Sparse layers | all 4 decoder layers |" in card.text
    assert "| Speech tower | Whisper encoder" in card.text and "| Sound tower | BEATs" in card.text
    assert "![Expert routing heatmap](routing_heatmap.png)" in card.text
    assert "| Multiple Choice | Synthetic MCQ | test | accuracy | 0.5 |" in card.text
    assert 'pip install "transformers>=5.19,<6"' in card.text  # the tested range (setup.cfg)

    # A Hub user: our packages unimportable, everything from org/tiny-unimoe, and the card's own usage snippet.
    write_media(tmp_path)
    ids = random_ids(2, 7)
    messages = [{"role": "user", "content": [
        {"type": "image", "path": str(tmp_path / "image.png")}, {"type": "text", "text": "Colour?"}]}]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        expected = {"ids": ids, "logits": model(ids).logits, "messages": messages, "inputs": dict(inputs)}
    torch.save(expected, tmp_path / "expected.pt")
    stdout = run_hub_client(
        f"""
        import torch
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
        from transformers import AutoModelForCausalLM, AutoProcessor
        expected = torch.load("expected.pt")
        model = AutoModelForCausalLM.from_pretrained("org/tiny-unimoe", trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], atol=1e-5, rtol=0)
        processor = AutoProcessor.from_pretrained("org/tiny-unimoe", trust_remote_code=True)
        inputs = processor.apply_chat_template(expected["messages"], tokenize=True, return_dict=True,
                                               add_generation_prompt=True, return_tensors="pt")
        assert inputs.keys() == expected["inputs"].keys()
        assert all(torch.equal(inputs[k], v) for k, v in expected["inputs"].items())
        try:
            hf_hub_download("org/tiny-unimoe", "adapter_config.json")
            raise AssertionError("a missing file was served")
        except EntryNotFoundError as error:
            print("MISSING", type(error).__name__)
        exec({usage_code(card.text)!r})
        print("USAGE_OK", type(processor).__name__)
        """,
        tmp_path,
    )
    assert "MISSING RemoteEntryNotFoundError" in stdout
    assert "USAGE_OK UniMoEProcessor" in stdout


def test_plain_model_and_processor_push_to_hub(hub, hub_client_env, online, tmp_path):
    folder = tmp_path / "model"
    model, _ = save_multimodal(folder, seed=3)
    stdout = run_with_package(
        f"""
        from modeling_unimoe import UniMoEForCausalLM, UniMoEProcessor
        from trl_scripts.hub.push_to_hub import HubTokenError, push_folder_to_hub
        model = UniMoEForCausalLM.from_pretrained({str(folder)!r})
        processor = UniMoEProcessor.from_pretrained({str(folder)!r})
        model.push_to_hub("org/plain")
        processor.push_to_hub("org/plain")
        # a card from our CLI survives later plain pushes (transformers keeps the repository's README.md)
        push_folder_to_hub({str(folder)!r}, "org/carded")
        model.generation_config.max_new_tokens = 7  # a change, so the plain push makes a commit
        model.push_to_hub("org/carded", commit_message="plain push")
        try:
            push_folder_to_hub({str(folder)!r}, "org/refused", token="hf_wrong")
        except HubTokenError as error:
            print("REFUSED", error)
        """,
        hub_env(hub, tmp_path), tmp_path,
    )
    plain = hub.repo("org/plain")
    assert not plain.private
    assert MODEL_FILES | CODE_FILES | PROCESSOR_FILES | {"README.md"} <= set(plain.files)
    assert "auto_map" in json.loads(plain.files["config.json"])
    assert ModelCard(plain.files["README.md"].decode()).data.library_name == "transformers"
    carded = hub.repo("org/carded")
    assert carded.commits[-1].title == "plain push"
    assert json.loads(carded.files["generation_config.json"])["max_new_tokens"] == 7
    assert "## Architecture" in carded.files["README.md"].decode()
    assert "REFUSED The Hub at" in stdout and "refused the token for org/refused (401" in stdout
    assert ("model", "org/refused") not in hub.repos
    # --private on an existing public repository makes it private
    push_folder_to_hub(folder, "org/plain", private=True, token=TOKEN, endpoint=hub.url)
    assert plain.private and "## Architecture" in plain.files["README.md"].decode()

    ids = random_ids(1, 9, seed=4)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    stdout = run_hub_client(
        """
        import torch
        from transformers import AutoModelForCausalLM, AutoProcessor
        expected = torch.load("expected.pt")
        model = AutoModelForCausalLM.from_pretrained("org/plain", trust_remote_code=True)
        with torch.no_grad():
            torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], atol=1e-5, rtol=0)
        processor = AutoProcessor.from_pretrained("org/plain", trust_remote_code=True)
        print("LOADED", type(processor).__name__, processor.chat_template is not None)
        """,
        tmp_path,
    )
    assert "LOADED UniMoEProcessor True" in stdout


def test_peft_adapter_pushes_and_loads(hub, hub_client_env, online, tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    make_tiny_model(seed=5).save_pretrained(base_dir)
    load_tiny_processor().save_pretrained(base_dir)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      target_parameters=["mlp.experts.gate_up_proj"])
    model = get_peft_model(UniMoEForCausalLM.from_pretrained(base_dir), lora).eval()
    torch.manual_seed(6)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapter change the model
                parameter.normal_(std=0.05)
    model.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)

    # trained on a local folder: Hub users could not resolve that base model
    with pytest.raises(ValueError, match=r"local folder .* --base_model ORG/NAME"):
        check_model_folder(adapter_dir)

    push_folder_to_hub(base_dir, "org/lora-base", token=TOKEN, endpoint=hub.url)
    result = run_cli(["--model", str(adapter_dir), "--repo-id", "org/lora-adapter", "--base_model", "org/lora-base"],
                     hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    adapter = hub.repo("org/lora-adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(adapter.files)
    assert json.loads(adapter.files["adapter_config.json"])["base_model_name_or_path"] == "org/lora-base"
    card = ModelCard(adapter.files["README.md"].decode())
    assert card.data.library_name == "peft" and card.data.base_model == ["org/lora-base"]
    assert {"lora", "peft", "uni-moe"} <= set(card.data.tags)
    assert "A LoRA adapter (peft; r=4, alpha=8" in card.text and "`mlp.experts.gate_up_proj`" in card.text
    assert "PeftModel.from_pretrained(model, \"org/lora-adapter\")" in card.text

    ids = random_ids(2, 6, seed=7)
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(ids).logits
    with torch.no_grad():
        adapted = model(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    torch.save({"ids": ids, "logits": adapted}, tmp_path / "expected.pt")
    stdout = run_hub_client(
        f"""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        expected = torch.load("expected.pt")
        base = AutoModelForCausalLM.from_pretrained("org/lora-base", trust_remote_code=True)
        model = PeftModel.from_pretrained(base, "org/lora-adapter").eval()
        with torch.no_grad():
            torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], atol=1e-5, rtol=0)
        exec({usage_code(card.text)!r})
        print("ADAPTER_OK")
        """,
        tmp_path,
    )
    assert "ADAPTER_OK" in stdout


def test_push_without_token_is_a_clear_error(hub, tmp_path):
    folder = tmp_path / "model"
    make_tiny_model().save_pretrained(folder)
    load_tiny_processor().save_pretrained(folder)
    result = run_cli(["--model", str(folder), "--repo-id", "org/no-token"], hub_env(hub, tmp_path, token=None))
    assert result.returncode == 1
    assert "push_to_hub: error: No Hugging Face token" in result.stderr and "hf auth login" in result.stderr
    assert "Traceback" not in result.stderr
    assert ("model", "org/no-token") not in hub.repos


@pytest.fixture
def saved_multimodal(tmp_path):
    folder = tmp_path / "checkpoint"
    save_multimodal(folder)
    return folder


def _refused(hub, folder, match, repo_id="org/refused-input", **kwargs):
    with pytest.raises(ValueError, match=match):
        push_folder_to_hub(folder, repo_id, token=TOKEN, endpoint=hub.url, **kwargs)
    assert ("model", repo_id) not in hub.repos  # refused before anything was sent


def test_config_without_auto_map_is_refused(hub, saved_multimodal):
    config_path = saved_multimodal / "config.json"
    config = json.loads(config_path.read_text())
    del config["auto_map"]
    config_path.write_text(json.dumps(config))
    _refused(hub, saved_multimodal,
             r"config\.json has no `auto_map` entry for AutoConfig, AutoModelForCausalLM.*save_pretrained")


def test_missing_remote_code_is_refused(hub, saved_multimodal):
    # modeling_beats.py is not named in auto_map: modeling_unimoe.py imports it (relative imports are followed)
    (saved_multimodal / "modeling_beats.py").unlink()
    (saved_multimodal / "processing_unimoe.py").unlink()
    _refused(hub, saved_multimodal, r"lacks the remote-code files modeling_beats\.py, processing_unimoe\.py.*Re-save it")


def test_incomplete_folders_are_refused(hub, saved_multimodal, tmp_path):
    (saved_multimodal / "chat_template.jinja").unlink()
    _refused(hub, saved_multimodal, r"no chat template")
    (saved_multimodal / "processor_config.json").unlink()
    _refused(hub, saved_multimodal, r"multimodal model .* no processor_config\.json.*processor\.save_pretrained")
    (saved_multimodal / "model.safetensors").rename(saved_multimodal / "pytorch_model.bin")
    _refused(hub, saved_multimodal, r"No model\.safetensors .*found pytorch_model\.bin: only safetensors")
    _refused(hub, tmp_path / "nowhere", r"does not exist")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _refused(hub, tmp_path / "llama", r"model_type 'llama', not one of \('unimoe', 'unimoe_text'\)")
    _refused(hub, saved_multimodal, r"ORG/NAME", repo_id="no-namespace")


def test_a_text_only_folder_with_a_media_processor_is_refused(tmp_path):
    """A flat text-only checkpoint (no towers) beside a processor that prepares images and audio would publish a
    processor whose media the model refuses at every request."""
    from tests.utils.models import make_tiny_text_model
    from trl_scripts import load_tiny_processor

    folder = tmp_path / "text-only"
    make_tiny_text_model().save_pretrained(folder)
    load_tiny_processor().save_pretrained(folder)
    with pytest.raises(ValueError, match=r"processor_config\.json prepares image, video and audio inputs, but the "
                                         r"model is text-only \(model_type 'unimoe_text'\).*tokenizer"):
        check_model_folder(folder)
    (folder / "processor_config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"processor_config\.json holds a JSON list, not an object"):
        check_model_folder(folder)
    (folder / "processor_config.json").unlink()
    assert check_model_folder(folder).config.vision_config is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"task": None}, r"`task`"),
        ({"dataset": {"name": "x", "type": "y"}}, r"`dataset\.split`"),
        ({"metrics": {"accuracy": "high"}}, r"`metrics\.accuracy`"),
        ({"metrics": {"wer": float("nan")}}, r"`metrics\.wer`"),
        ({"metrics": {}}, r"`metrics`"),
    ],
)
def test_bad_eval_results_name_file_and_key(tmp_path, change, message):
    path = tmp_path / "eval_results_bad.json"
    result = {"task": "asr", "dataset": {"name": "n", "type": "t", "split": "test"}, "metrics": {"wer": 0.1}} | change
    path.write_text(json.dumps(result))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: .*{message}"):
        load_eval_result(path)


def test_eval_results_file_that_is_not_json(hub, saved_multimodal):
    (saved_multimodal / "eval_results_asr.json").write_text("{not json")
    _refused(hub, saved_multimodal, r"eval_results_asr\.json is not valid JSON")


def test_an_upcycled_text_only_checkpoint_publishes_and_loads_from_the_hub(hub, hub_client_env, online, tmp_path):
    """What `unimoe-upcycle` writes (the flat text-only layout, `UniMoETextForCausalLM`, with the dense model's
    tokenizer) passes the folder checks, gets a text-generation card, and loads from the Hub through remote code."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trl_scripts.training.presets import CHAT_TEMPLATE_PATH
    from trl_scripts.training.upcycling import main as upcycle_cli

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    ))
    dense.save_pretrained(tmp_path / "dense")
    tokenizer = load_tiny_processor().tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE_PATH.read_text()  # a chat LLaMA's tokenizer carries its template
    tokenizer.save_pretrained(tmp_path / "dense")
    folder = tmp_path / "moe"
    upcycle_cli(["--dense", str(tmp_path / "dense"), "--output_dir", str(folder), "--num_experts", "2"])
    result = run_cli(["--model", str(folder), "--repo-id", "org/text-moe"], hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    repo = hub.repo("org/text-moe")
    config = json.loads(repo.files["config.json"])
    assert (config["model_type"], config["auto_map"]["AutoModelForCausalLM"]) == ("unimoe_text", "modeling_unimoe.UniMoETextForCausalLM")
    card = ModelCard(repo.files["README.md"].decode())
    assert card.data.pipeline_tag == "text-generation" and "| Experts | 2 routed per sparse layer" in card.text

    ids = random_ids(1, 9, seed=4)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": dense(ids).logits}, tmp_path / "expected.pt")
    stdout = run_hub_client(
        """
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        expected = torch.load("expected.pt")
        model = AutoModelForCausalLM.from_pretrained("org/text-moe", trust_remote_code=True)
        with torch.no_grad():  # upcycled from identical experts: the dense model's function
            torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], atol=1e-5, rtol=0)
        print("LOADED", type(model).__name__, len(AutoTokenizer.from_pretrained("org/text-moe")))
        """,
        tmp_path,
    )
    assert f"LOADED UniMoETextForCausalLM {len(load_tiny_processor().tokenizer)}" in stdout
    # the card's own snippet answers as the processor-built prompt does (BOS included: the Vicuna template leaves it
    # to the tokenizer)
    model = UniMoETextForCausalLM.from_pretrained(folder)
    question = re.search(r'"content": "([^"]+)"', usage_code(card.text)).group(1)
    processor = load_processor(str(folder))
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    expected = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert run_hub_client(usage_code(card.text), tmp_path).strip() == expected.strip()


def test_a_tokenizer_only_folder_whose_tokenizer_does_not_load_is_refused(tmp_path):
    from tests.utils.models import make_tiny_text_model

    from trl_scripts.training.presets import CHAT_TEMPLATE_PATH

    make_tiny_text_model().save_pretrained(tmp_path)
    tokenizer = load_tiny_processor().tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE_PATH.read_text()
    tokenizer.save_pretrained(tmp_path)
    check_model_folder(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r": its tokenizer does not load \(.*\); save it again with `tokenizer.save_pretrained\(DIR\)`"):
        check_model_folder(tmp_path)


def test_card_of_a_text_only_model(tmp_path):
    config = load_preset("tiny", text_only=True, moe_layers="even", num_shared_experts=1)
    card = build_model_card(tmp_path, "org/text-moe", config, license="mit", has_processor=False,
                            eval_results=[{"task": "asr", "dataset": {"name": "Tones", "type": "tones", "split": "dev"},
                                           "metrics": {"wer": 0.25}}])
    assert card.data.pipeline_tag == "text-generation" and card.data.license == "mit"
    assert "multimodal" not in card.data.tags and card.data.base_model is None
    assert card.data.eval_results[0].task_type == "automatic-speech-recognition"
    assert "| Sparse layers | 2 of 4 decoder layers (even layers) |" in card.text
    assert "| Experts | 4 routed + 1 shared per sparse layer" in card.text
    assert "AutoTokenizer.from_pretrained(\"org/text-moe\", trust_remote_code=True)" in card.text
    assert "routing_heatmap" not in card.text  # none in the folder: no section
    assert "| Speech Recognition | Tones | dev | wer | 0.25 |" in card.text


def test_an_unreachable_endpoint_is_one_line_naming_it(online, tmp_path):
    """A 75-line httpx ConnectError traceback before; port 9 (discard) refuses connections on 127.0.0.1."""
    from trl_scripts.hub.push_to_hub import HubConnectionError

    folder = tmp_path / "model"
    make_tiny_model().save_pretrained(folder)
    load_tiny_processor().save_pretrained(folder)
    endpoint = "http://127.0.0.1:9"
    with pytest.raises(HubConnectionError, match=rf"^Cannot reach the Hub at {re.escape(endpoint)} to push me/x: ConnectError"):
        push_folder_to_hub(folder, "me/x", token="x", endpoint=endpoint)
    env = {name: value for name, value in os.environ.items() if not name.startswith("HF_")}
    env |= {"HF_ENDPOINT": endpoint, "HF_TOKEN": "x", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0",
            "PYTHONPATH": str(REPO_ROOT)}  # fmt: skip
    result = run_cli(["--model", str(folder), "--repo-id", "me/x"], env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"push_to_hub: error: Cannot reach the Hub at {endpoint} to push me/x")


def test_offline_mode_is_one_line_too(tmp_path, monkeypatch):
    from trl_scripts.hub.push_to_hub import HubConnectionError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = tmp_path / "model"
    make_tiny_model().save_pretrained(folder)
    load_tiny_processor().save_pretrained(folder)
    with pytest.raises(HubConnectionError, match=r"^Cannot push me/x to http://127\.0\.0\.1:9: offline mode is enabled \(HF_HUB_OFFLINE\)"):
        push_folder_to_hub(folder, "me/x", token="x", endpoint="http://127.0.0.1:9")


def test_cli_publishes_the_chat_space_which_runs_from_the_hub(hub, online, tmp_path):
    folder = tmp_path / "model"
    save_multimodal(folder)
    result = run_cli(["--model", str(folder), "--repo-id", "org/chat-model", "--private", "--space", "org/chat-space"],
                     hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Pushed the chat Space to" in result.stdout and "org/chat-space" in result.stdout
    assert "give the Space an HF_TOKEN secret that can read org/chat-model" in result.stderr

    space = hub.repo("org/chat-space", repo_type="space")
    assert space.private and [c.title for c in space.commits] == ["initial commit", "Upload the Uni-MoE chat app"]
    written = write_space(tmp_path / "expected-space", "org/chat-model")
    expected = {path.relative_to(written).as_posix(): path.read_bytes() for path in written.rglob("*") if path.is_file()}
    assert {name: content for name, content in space.files.items() if name != ".gitattributes"} == expected
    card = ModelCard(space.files["README.md"].decode())  # the front matter Spaces read
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py" and card.data.models == ["org/chat-model"]
    assert ("model", "org/chat-model") in hub.repos

    # The Space at work: its files in a fresh interpreter (our packages only from there) loading org/chat-model
    space_dir = tmp_path / "space-clone"
    for name, content in space.files.items():
        (space_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (space_dir / name).write_bytes(content)
    code = textwrap.dedent(
        """
        import os, sys
        sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
        import app
        from trl_scripts.serving.chat_app import ChatApp
        chat = ChatApp.from_pretrained(app.MODEL_ID, device="cpu")
        *_, (answer, heatmap) = chat.respond({"text": "Hello", "files": []}, [], 4)
        ours = [m.__file__ or list(m.__path__)[0] for n, m in sys.modules.items() if n.split(".")[0] in ("trl_scripts", "modeling_unimoe")]
        print("MODEL", type(chat.model).__module__, "HEATMAP", type(heatmap).__name__,
              "OUTSIDE", [path for path in ours if not path.startswith(os.getcwd() + os.sep)])
        """
    )
    env = hub_env(hub, tmp_path) | {"PYTHONPATH": "", "GRADIO_ANALYTICS_ENABLED": "False"}
    ran = subprocess.run([sys.executable, "-c", code], cwd=space_dir, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-4000:]
    # the classes of the Space's copy of modeling_unimoe (registered with the Auto classes), the files of the Hub's
    assert "MODEL modeling_unimoe.modeling_unimoe HEATMAP Image OUTSIDE []" in ran.stdout, ran.stdout


def test_space_is_refused_before_anything_is_pushed(hub, online, tmp_path, monkeypatch):
    from trl_scripts.hub.push_to_hub import main

    folder = tmp_path / "model"
    save_multimodal(folder)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(SystemExit, match=r"repo_id 'no-namespace' must be ORG/NAME"):
        main(["--model", str(folder), "--repo-id", "org/space-refused", "--space", "no-namespace"])
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(SystemExit, match=r"--space needs a full model; .* is a peft adapter"):
        main(["--model", str(folder), "--repo-id", "org/space-refused", "--space", "org/space"])
    assert ("model", "org/space-refused") not in hub.repos and ("space", "org/space") not in hub.repos
