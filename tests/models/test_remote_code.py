"""Real clients: a fresh interpreter, our packages NOT importable, loading saved folders through the Auto classes."""

import json

import torch

from tests.utils.models import make_tiny_model, random_ids
from tests.utils.processes import run_fresh_python


def test_fresh_process_loads_with_trust_remote_code(tmp_path):
    model = make_tiny_model(num_shared_experts=1, moe_layers="even")
    checkpoint = tmp_path / "tiny-unimoe"
    model.save_pretrained(checkpoint)
    files = {path.name for path in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_unimoe.py", "configuration_unimoe.py"} <= files
    auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_unimoe.UniMoEConfig",
        "AutoModel": "modeling_unimoe.UniMoEModel",
        "AutoModelForCausalLM": "modeling_unimoe.UniMoEForCausalLM",
    }

    ids = random_ids(2, 9)
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(ids).logits

    stdout = run_fresh_python(
        f"""
        import sys, torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert type(model).__name__ == "UniMoEForCausalLM"
        base = AutoModel.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        assert type(base).__name__ == "UniMoEModel"
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
        ours = sorted(name for name in sys.modules if name.split(".")[0] in ("modeling_unimoe", "trl_scripts"))
        print("OUR_MODULES", ours)
        print("EXPERTS", model.get_experts_implementation())
        """,
        tmp_path,
    )
    assert "OUR_MODULES []" in stdout
    assert "grouped_mm" in stdout  # the decorator is honoured in remote code too
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5, rtol=0)


def test_remote_model_resaves_with_code(tmp_path):
    """A model loaded as remote code saves the code again, so a fine-tuned copy stays loadable."""
    first, second = tmp_path / "first", tmp_path / "second"
    make_tiny_model().save_pretrained(first)
    run_fresh_python(
        f"""
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(first)!r}, trust_remote_code=True)
        model.save_pretrained({str(second)!r})
        reloaded = AutoModelForCausalLM.from_pretrained({str(second)!r}, trust_remote_code=True)
        print(type(reloaded).__name__)
        """,
        tmp_path,
    )
    assert (second / "modeling_unimoe.py").is_file() and (second / "configuration_unimoe.py").is_file()
