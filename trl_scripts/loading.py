"""Loading a checkpoint the way every tool that runs one does (`unimoe-evaluate`, `unimoe-serve`, `unimoe-chat`): the
`--model` path checked as a local folder or a Hub id, `--device`, `--dtype`, `--quantization` and
`--experts_implementation` checked, the model and
its processor through the Auto classes (a text-only checkpoint's processor built from its tokenizer)."""

from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoModelForCausalLM, AutoProcessor, ProcessorMixin

from modeling_unimoe import UniMoEConfig, UniMoEProcessor
from modeling_unimoe.quantization_unimoe import UniMoEInt8Config


DTYPES = ("auto", "float32", "bfloat16", "float16")
# `--quantization`: the `quantization_config` class each value loads with (`modeling_unimoe.quantization_unimoe`). A
# class, not a dict: transformers refuses a dict for a checkpoint that is already quantised, and takes the saved
# config when the class matches.
QUANTIZATIONS = {"none": None, "int8": UniMoEInt8Config}
# `--experts_implementation`: the experts kernel (`from_pretrained(experts_implementation=...)`); "default" leaves
# transformers' choice (grouped_mm). eager is the fastest float32 kernel on CPU (docs/benchmarks.md).
EXPERTS_IMPLEMENTATIONS = ("default", "eager", "grouped_mm", "batched_mm")


def readable_modalities(config) -> set[str]:
    """The media a checkpoint's towers read: image and video with a vision tower, audio with a speech or sound tower
    (none for a text-only config of either layout)."""
    readable = set()
    if getattr(config, "vision_config", None) is not None:
        readable |= {"image", "video"}
    if getattr(config, "audio_towers", None):
        readable.add("audio")
    return readable


def load_processor(model_path: str, revision: str | None = None):
    """The checkpoint's `AutoProcessor`. A text-only checkpoint in the flat layout (`UniMoETextForCausalLM`, as
    `unimoe-upcycle` writes it) ships a tokenizer only: its processor is built from that tokenizer and its chat
    template (Uni-MoE's processor handles a model without towers as text, and names the modality it cannot take).
    `ValueError` when such a tokenizer has no chat template."""
    processor = AutoProcessor.from_pretrained(model_path, revision=revision, trust_remote_code=True)
    if isinstance(processor, ProcessorMixin):
        return processor
    tokenizer = processor
    if not tokenizer.chat_template:
        raise ValueError(
            f"{model_path} has a tokenizer but no processor and no chat template to build one from: save the "
            "tokenizer with a chat template (`tokenizer.chat_template = ...; tokenizer.save_pretrained(DIR)`) or a "
            "processor (`processor.save_pretrained(DIR)`) next to the model"
        )
    config = UniMoEConfig.from_pretrained(model_path, revision=revision)
    return UniMoEProcessor.from_model_config(config, tokenizer, chat_template=tokenizer.chat_template)


def quantization_kwargs(quantization: str) -> dict:
    """The `from_pretrained` keyword arguments of `--quantization` (empty for none); an unknown value is an error
    naming the choices."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    config_class = QUANTIZATIONS[quantization]
    return {} if config_class is None else {"quantization_config": config_class()}


def model_kwargs(quantization: str = "none", experts_implementation: str = "default") -> dict:
    """The `from_pretrained` keyword arguments of `--quantization` and `--experts_implementation`. Errors name the
    choices for an unknown value, and refuse a kernel with int8: its experts run their own int8 product, which no
    `experts_implementation` reaches."""
    kwargs = quantization_kwargs(quantization)
    if experts_implementation not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(
            f"--experts_implementation {experts_implementation!r}: expected one of {', '.join(EXPERTS_IMPLEMENTATIONS)}"
        )
    if experts_implementation != "default":
        if kwargs:
            raise ValueError(
                f"--experts_implementation {experts_implementation} does not apply with --quantization {quantization}: "
                "the int8 experts run their own kernel (leave --experts_implementation at default)"
            )
        kwargs["experts_implementation"] = experts_implementation
    return kwargs


def available_devices() -> list[str]:
    """The devices this torch can run on: cpu, then each CUDA device, mps, xpu where present."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        devices += [f"xpu:{index}" for index in range(torch.xpu.device_count())]
    return devices


def resolve_device(device: str | None) -> str:
    """`device` checked (cuda when available if None): a device name this torch knows, and present here."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"--device {device!r} is not a device name (e.g. cpu, cuda, cuda:1): {error}") from None
    if parsed.type == "cpu":
        return device
    available = available_devices()
    if parsed.type == "cuda" and torch.version.cuda is None and torch.version.hip is None:
        why = f"this torch ({torch.__version__}) is built without CUDA"
    elif parsed.type == "cuda" and not torch.cuda.is_available():
        why = "no CUDA device is visible"
    elif parsed.index is None and any(name.split(":")[0] == parsed.type for name in available):
        return device
    elif str(parsed) in available:
        return device
    else:
        why = "no such device here"
    raise ValueError(f"--device {device!r} is not available: {why}; available: {', '.join(available)}")


def check_model_path(model_path: str) -> bool:
    """Whether `model_path` is a local checkpoint folder (True) or to be tried as a Hub model id (False); a path
    that cannot be either is refused: a missing folder (a path whose parent exists, or that is not a repo id), a
    file, a folder without config.json."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"--model {model_path!r}: {path.resolve()} is not a checkpoint: it has no config.json (expected a folder "
                "written by save_pretrained: the model and its processor)"
            )
        return True
    if path.exists():
        raise NotADirectoryError(f"--model {model_path!r} is a file; expected a checkpoint folder written by save_pretrained")
    try:
        validate_repo_id(model_path)
        # ORG/NAME, where no local folder ORG exists: a Hub model id; anything else meant a local folder
        repo_id = model_path.count("/") == 1 and not model_path.startswith((".", "~")) and not path.parent.is_dir()
    except HFValidationError:
        repo_id = False
    if not repo_id:
        raise FileNotFoundError(
            f"--model {model_path!r}: no such folder ({path.resolve()}); expected a checkpoint folder written by save_pretrained"
        )
    return False


def load_model_and_processor(
    model_path: str, device: str | None = None, dtype: str = "auto", quantization: str = "none",
    experts_implementation: str = "default",
):  # fmt: skip
    """The checkpoint's model (eval mode, on `device`, quantised as `quantization` says, its experts run by
    `experts_implementation`) and processor (left padding), both through the Auto classes; a checkpoint that does not
    load is one error naming it."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    load_kwargs = model_kwargs(quantization, experts_implementation)
    device = resolve_device(device)
    local = check_model_path(model_path)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True, dtype=torch_dtype, **load_kwargs)
        processor = load_processor(model_path)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if not local:
            raise FileNotFoundError(
                f"--model {model_path!r}: no such folder ({Path(model_path).resolve()}), and not loadable as a Hub "
                f"model id ({reason})"
            ) from error
        raise ValueError(f"--model {model_path!r}: cannot load the checkpoint in {Path(model_path).resolve()}: {reason}") from error
    model = model.to(device).eval()
    processor.tokenizer.padding_side = "left"  # decoder-only batch generation continues from the last position
    return model, processor
