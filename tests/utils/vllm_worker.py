"""Runs a checkpoint in vLLM's offline API for tests/serving/test_vllm.py, in the vLLM venv (.venv-vllm), where neither
`modeling_unimoe` nor `trl_scripts` is installed: vLLM loads the model through the checkpoint's remote code.

    vllm_worker.py JOB_JSON REPORT_JSON

JOB_JSON: {"model": dir, "max_tokens": n, "prompts": [{"prompt_token_ids": [...]} | {"prompt": str, "image": png}
| {"prompt": str, "audio": wav}],
"check_weights": bool}. REPORT_JSON gets {"tokens": [[id, ...] per prompt], "weights": see `weight_report`}.
"""

import json
import os
import sys
from pathlib import Path


def engine(model: str):
    # the engine and its one worker in this process, so that `record_weight_report` sees the load
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    # float32 as our reference; eager (no graph capture) and a small KV cache: these tests run on 2 CPU cores beside
    # other jobs
    return LLM(
        model=model, trust_remote_code=True, model_impl="transformers", dtype="float32", max_model_len=512,
        enforce_eager=True, kv_cache_memory_bytes=1 << 28, seed=0,
        distributed_executor_backend="uni",
    )


def weight_report(model, loaded: set[str], checkpoint: str) -> dict:
    """Accounts for every parameter of vLLM's model right after its loader (`load_weights`) ran, before vLLM repacks
    the weights for its kernels: each checkpoint tensor must be found, with its exact values, in the vLLM parameter of
    its name or as consecutive rows of a parameter of the same module that vLLM fused (q/k/v -> qkv_proj, gate/up ->
    gate_up_proj, the experts -> w13 / w2), and every vLLM parameter must be covered in full."""
    import torch
    from safetensors.torch import load_file

    state = {}
    for path in sorted(Path(checkpoint).glob("*.safetensors")):
        state.update(load_file(path))
    params = {name: param.detach().cpu() for name, param in model.named_parameters()}
    covered = {name: torch.zeros(param.shape[0], dtype=torch.bool) for name, param in params.items()}
    unmatched = []
    for key, tensor in model.hf_to_vllm_mapper.apply(state.items()):
        if key in params and params[key].shape == tensor.shape:
            candidates = [key]
        else:
            parent = key.rsplit(".", 2)[0] + "."
            candidates = [name for name in params if name.startswith(parent) and params[name].shape[1:] == tensor.shape[1:]]
        for name in candidates:
            param, rows = params[name], tensor.shape[0]
            found = [o for o in range(param.shape[0] - rows + 1) if torch.equal(param[o : o + rows], tensor.to(param.dtype))]
            # equal slices (e.g. two zero biases): the first one not yet accounted for
            offset = next((o for o in found if not covered[name][o : o + rows].any()), found[0] if found else None)
            if offset is not None:
                covered[name][offset : offset + rows] = True
                break
        else:
            unmatched.append(key)
    return {
        "checkpoint_tensors": len(state),
        "vllm_parameters": len(params),
        "not_loaded": sorted(set(params) - loaded),
        "unmatched_checkpoint_tensors": sorted(unmatched),
        "not_covered": sorted(name for name, rows in covered.items() if not bool(rows.all())),
    }


def record_weight_report(checkpoint: str, report: dict):
    """Wraps the Transformers backend's `load_weights` (this process only: the engine runs in-process) so that the
    report is taken on the weights exactly as vLLM's loader wrote them."""
    from vllm.model_executor.models.transformers.base import Base

    load_weights = Base.load_weights

    def recording(self, weights):
        loaded = load_weights(self, weights)
        report.update(weight_report(self, set(loaded), checkpoint))
        return loaded

    Base.load_weights = recording


def main():
    job = json.loads(Path(sys.argv[1]).read_text())
    import soundfile
    from PIL import Image
    from vllm import SamplingParams

    weights = {}
    if job.get("check_weights"):
        record_weight_report(job["model"], weights)
    llm = engine(job["model"])
    prompts = []
    for prompt in job["prompts"]:
        if "image" in prompt:
            prompts.append({"prompt": prompt["prompt"], "multi_modal_data": {"image": Image.open(prompt["image"]).convert("RGB")}})
        elif "audio" in prompt:
            waveform, rate = soundfile.read(prompt["audio"], dtype="float32")
            prompts.append({"prompt": prompt["prompt"], "multi_modal_data": {"audio": (waveform, rate)}})
        else:
            prompts.append({"prompt_token_ids": prompt["prompt_token_ids"]})
    outputs = llm.generate(prompts, SamplingParams(max_tokens=job["max_tokens"], temperature=0.0), use_tqdm=False)
    report = {"tokens": [list(output.outputs[0].token_ids) for output in outputs]}
    if job.get("check_weights"):
        report["weights"] = weights
    Path(sys.argv[2]).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
