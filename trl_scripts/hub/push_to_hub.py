"""Publish a saved Uni-MoE checkpoint (or a peft adapter) to the Hugging Face Hub with a generated model card.

    python -m trl_scripts.push_to_hub --model out/stage3 --repo-id ORG/NAME [--private] \
        [--eval_results results/vqa.json ...] [--base_model lmsys/vicuna-7b-v1.5 ...] [--datasets ...] \
        [--space ORG/NAME-chat]

The folder is what `model.save_pretrained(DIR)` and `processor.save_pretrained(DIR)` write: safetensors weights,
`config.json` with `auto_map`, the flat remote-code files, the processor files and chat template. It is checked before
anything is sent (a folder Hub users could not load with `trust_remote_code=True` is refused, saying how to re-save
it), then uploaded in one commit together with the model card (`trl_scripts.hub.model_card`): evaluation results from
`--eval_results` and from `eval_results*.json` in the folder become model-index entries, and `routing_heatmap.png`
in the folder is embedded. Training leftovers (`checkpoint-*`, optimizer states, pickles) are not uploaded.

A peft adapter folder (`adapter_config.json` + `adapter_model.safetensors`) is published the same way; its base model
must be a Hub repository (`--base_model ORG/BASE` when the adapter was trained on a local folder).

`--space ORG/NAME` also publishes a gradio Space running the chat app (`trl_scripts.serving.chat_app`) on the pushed
model, written by `trl_scripts.hub.space` (the app with this package's code, pinned requirements, the Space card), after
the model's commit; private too with `--private`. Adapters get none (the chat needs a full model).
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import filter_repo_objects, validate_repo_id
from transformers import HfArgumentParser
from transformers.dynamic_module_utils import get_relative_imports

from transformers import AutoTokenizer

from modeling_unimoe import UniMoEConfig, UniMoETextConfig

try:  # the HTTP client huggingface_hub uses (httpx2 in the releases this package needs; httpx before)
    import httpx2 as http_client
except ImportError:  # pragma: no cover
    import httpx as http_client

from ..console import command_line
from .model_card import EVAL_RESULTS_PATTERN, build_model_card, load_eval_result, modalities
from .space import write_space


logger = logging.getLogger(__name__)

# Never uploaded: training state, pickles (the Hub flags them; weights are safetensors only), caches, the old card.
IGNORE_PATTERNS = [
    "README.md", "checkpoint-*", "runs/*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "trainer_state.json",
    "__pycache__/*", "*.pyc", ".git/*", ".cache/*", ".ipynb_checkpoints/*",
]
REQUIRED_AUTO_MAP = ("AutoConfig", "AutoModelForCausalLM")
# the composite model's checkpoints and the text-only layout's (`UniMoETextForCausalLM`)
MODEL_TYPES = (UniMoEConfig.model_type, UniMoETextConfig.model_type)
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
RESAVE_HINT = (
    "Re-save it with this package's save_pretrained, which writes `auto_map` and copies the remote-code files: "
    "`UniMoEForCausalLM.from_pretrained(DIR).save_pretrained(DIR)` and "
    "`UniMoEProcessor.from_pretrained(DIR).save_pretrained(DIR)` (both from `modeling_unimoe`)."
)


class HubTokenError(RuntimeError):
    """No usable Hugging Face token for the push."""


class HubConnectionError(ConnectionError):
    """The Hub endpoint cannot be reached: connection refused, unknown host, timeout, TLS failure, offline mode."""


class HubRequestError(RuntimeError):
    """The Hub answered the push with an HTTP error other than a refused token."""


@contextmanager
def _hub_errors(endpoint: str, repo_id: str):
    """huggingface_hub's network and HTTP errors (tracebacks of httpx internals) as one-line errors naming the
    endpoint: `HubConnectionError` when it cannot be reached, `HubTokenError` for 401/403, else `HubRequestError`."""
    try:
        yield
    except OfflineModeIsEnabled:
        raise HubConnectionError(
            f"Cannot push {repo_id} to {endpoint}: offline mode is enabled (HF_HUB_OFFLINE); unset it to push"
        ) from None
    except http_client.TransportError as error:
        raise HubConnectionError(
            f"Cannot reach the Hub at {endpoint} to push {repo_id}: {type(error).__name__} ({error}). Check the "
            "network, HF_ENDPOINT and proxy settings"
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        message = error.server_message or (error.response.reason_phrase if error.response is not None else str(error))
        message = " ".join(str(message).split())
        if status in (401, 403):
            raise HubTokenError(
                f"The Hub at {endpoint} refused the token for {repo_id} ({status}: {message}). Use a write token "
                "with access to that namespace (`hf auth login`, HF_TOKEN or --token)."
            ) from None
        raise HubRequestError(f"The Hub at {endpoint} refused the push to {repo_id} ({status}: {message})") from None


@dataclass
class CheckedFolder:
    """A folder that passed `check_model_folder`."""

    path: Path
    config: UniMoEConfig | None = None  # a model folder's config
    adapter_config: dict | None = None  # a peft adapter's config
    base_model: str | None = None  # the adapter's recorded base model: a Hub id or a local folder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _missing_remote_code(folder: Path, auto_maps: list[dict]) -> list[str]:
    """Code files the `auto_map` entries need (with their relative imports, recursively) that `folder` lacks."""
    pending = {
        reference.split(".")[0] + ".py"
        for auto_map in auto_maps
        for references in auto_map.values()
        for reference in ([references] if isinstance(references, str) else references)
        if reference and "--" not in reference  # "org/repo--module.Class" lives in another repository
    }
    seen, missing = set(), []
    while pending:
        name = pending.pop()
        seen.add(name)
        if not (folder / name).is_file():
            missing.append(name)
            continue
        pending |= {f"{module}.py" for module in get_relative_imports(folder / name)} - seen
    return sorted(missing)


def _check_weights(folder: Path, stem: str) -> None:
    if (folder / f"{stem}.safetensors").is_file():
        return
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{index} lists no weight shards (`weight_map` is empty)")
        absent = [shard for shard in shards if not (folder / shard).is_file()]
        if absent:
            raise ValueError(f"{folder} lacks weight shards listed in {index.name}: {', '.join(absent)}")
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth") and stem in p.name)
    found = f" (found {', '.join(pickled)}: only safetensors are published)" if pickled else ""
    raise ValueError(f"No {stem}.safetensors (or sharded index) in {folder}{found}. {RESAVE_HINT}")


def _has_chat_template(folder: Path) -> bool:
    if any((folder / name).is_file() for name in CHAT_TEMPLATE_FILES) or (folder / "additional_chat_templates").is_dir():
        return True
    return any(
        (folder / name).is_file() and _read_json(folder / name).get("chat_template")
        for name in ("processor_config.json", "tokenizer_config.json")
    )


def check_model_folder(folder: str | Path, base_models: list[str] | None = None) -> CheckedFolder:
    """Checks that `folder` is a complete Uni-MoE checkpoint (or peft adapter) that Hub users can load.

    `base_models[0]`, when given, is an adapter's base model on the Hub (replacing a local folder it was trained on).
    Raises a `ValueError` naming what is missing and how to fix it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Model folder {folder} does not exist")
    if (folder / "adapter_config.json").is_file():
        return _check_adapter_folder(folder, base_models)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"{folder} has no config.json: it is neither a saved model (model.save_pretrained(DIR)) nor a peft "
            "adapter (adapter_config.json)"
        )
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} holds a JSON {type(config).__name__}, not an object of config fields")
    if config.get("model_type") not in MODEL_TYPES:
        raise ValueError(
            f"{config_path} has model_type {config.get('model_type')!r}, not one of {MODEL_TYPES}: not a Uni-MoE "
            "checkpoint (convert or upcycle it first, e.g. with `unimoe-upcycle`)"
        )
    auto_map = config.get("auto_map") or {}
    lacking = [name for name in REQUIRED_AUTO_MAP if name not in auto_map]
    if lacking:
        raise ValueError(
            f"{config_path} has no `auto_map` entry for {', '.join(lacking)}, so Hub users could not load it with "
            f"trust_remote_code=True. {RESAVE_HINT}"
        )
    _check_weights(folder, "model")

    parsed = UniMoEConfig.from_dict(config)  # a text-only checkpoint's flat config reads as one without towers
    multimodal = len(modalities(parsed)) > 1
    processor_path = folder / "processor_config.json"
    auto_maps = [auto_map]
    if processor_path.is_file():
        processor_config = _read_json(processor_path)
        if not isinstance(processor_config, dict):
            raise ValueError(f"{processor_path} holds a JSON {type(processor_config).__name__}, not an object of fields")
        media = {"image_processor": "image, video", "feature_extractor": "audio"}
        prepared = [kinds for key, kinds in media.items() if processor_config.get(key)]
        if config["model_type"] == UniMoETextConfig.model_type and prepared:
            raise ValueError(
                f"{processor_path} prepares {' and '.join(prepared)} inputs, but the model is text-only (model_type "
                f"{config['model_type']!r}): it would refuse them at every request. Publish the tokenizer alone: "
                "delete processor_config.json and save `processor.tokenizer.save_pretrained(DIR)`."
            )
        processor_auto_map = processor_config.get("auto_map") or {}
        if "AutoProcessor" not in processor_auto_map:
            raise ValueError(
                f"{processor_path} has no `auto_map` entry for AutoProcessor, so AutoProcessor could not load it "
                f"from the Hub. {RESAVE_HINT}"
            )
        auto_maps.append(processor_auto_map)
    elif multimodal:
        raise ValueError(
            f"{folder} has a multimodal model ({', '.join(modalities(parsed))}) but no processor_config.json: save the "
            "processor next to the model with `processor.save_pretrained(DIR)`"
        )
    elif not (folder / "tokenizer_config.json").is_file():
        raise ValueError(f"{folder} has no tokenizer: save it next to the model with `tokenizer.save_pretrained(DIR)`")
    else:  # a tokenizer alone (the text-only layout): the processor is built from it, so it must load
        try:
            AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"{folder}: its tokenizer does not load ({reason}); save it again with `tokenizer.save_pretrained(DIR)`"
            ) from error
    missing = _missing_remote_code(folder, auto_maps)
    if missing:
        raise ValueError(
            f"{folder} lacks the remote-code files {', '.join(missing)} that its `auto_map` needs, so Hub users could "
            f"not load it with trust_remote_code=True. {RESAVE_HINT}"
        )
    if not _has_chat_template(folder):
        raise ValueError(
            f"{folder} has no chat template (chat_template.jinja, or `chat_template` in processor_config.json / "
            "tokenizer_config.json): save the processor or tokenizer that has it with `processor.save_pretrained(DIR)`"
        )
    return CheckedFolder(folder, config=parsed)


def _check_adapter_folder(folder: Path, base_models: list[str] | None) -> CheckedFolder:
    config_path = folder / "adapter_config.json"
    adapter_config = _read_json(config_path)
    if not adapter_config.get("peft_type"):
        raise ValueError(f"{config_path} has no `peft_type`: not a peft adapter config")
    _check_weights(folder, "adapter_model")
    recorded = adapter_config.get("base_model_name_or_path")
    if not base_models and not recorded:
        raise ValueError(f"{config_path} names no `base_model_name_or_path`: pass --base_model ORG/NAME (its Hub id)")
    if not base_models and Path(recorded).is_dir():
        raise ValueError(
            f"{config_path} names the local folder {recorded} as its base model, which Hub users cannot resolve: "
            "publish the base model and pass --base_model ORG/NAME (its Hub id)"
        )
    return CheckedFolder(folder, adapter_config=adapter_config, base_model=base_models[0] if base_models else recorded)


def check_repo_id(repo_id: str) -> None:
    """A `ValueError` unless `repo_id` is a valid ORG/NAME (or USER/NAME) Hub repository id."""
    validate_repo_id(repo_id)
    if "/" not in repo_id:
        raise ValueError(f"repo_id {repo_id!r} must be ORG/NAME (or USER/NAME)")


def resolve_token(token: str | None = None) -> str:
    """`token`, else the one from `HF_TOKEN` / `hf auth login`; a clear error when there is none."""
    token = token or get_token()
    if not token:
        raise HubTokenError(
            "No Hugging Face token: pushing needs a write token. Run `hf auth login`, set HF_TOKEN, or pass --token."
        )
    return token


def _adapter_base_config(checked: CheckedFolder, api: HfApi) -> UniMoEConfig:
    """The adapter's base model config: from the folder it was trained on when that is here, else from the Hub."""
    recorded = checked.adapter_config.get("base_model_name_or_path")
    local = Path(recorded) / "config.json" if recorded and (Path(recorded) / "config.json").is_file() else None
    try:
        return UniMoEConfig.from_dict(_read_json(Path(local or api.hf_hub_download(checked.base_model, "config.json"))))
    except (OSError, ValueError, HfHubHTTPError) as error:
        source = local or checked.base_model
        raise ValueError(f"Cannot read the config of the adapter's base model {source}: {error}") from None


def upload_operations(folder: Path, readme: str, replaced: dict[str, bytes] | None = None) -> list[CommitOperationAdd]:
    """One commit's files: the folder (minus `IGNORE_PATTERNS`), `replaced` files' new content, the README."""
    replaced = replaced or {}
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    kept = list(filter_repo_objects(files, ignore_patterns=IGNORE_PATTERNS))
    if skipped := sorted(set(files) - set(kept) - {"README.md"}):
        logger.info("Not uploading %d training/cache file(s): %s", len(skipped), ", ".join(skipped[:10]))
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=replaced.get(name, str(folder / name))) for name in kept
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode()))
    return operations


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    eval_result_files: list[str | Path] | None = None,
    license: str | None = "apache-2.0",
    base_models: list[str] | None = None,
    datasets: list[str] | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> CommitInfo:
    """Checks `folder`, builds its model card and publishes both to `repo_id` in one commit; returns the commit.

    `private` makes the repository private (also when it already exists). `endpoint` defaults to `HF_ENDPOINT`.
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    checked = check_model_folder(folder, base_models)
    result_files = [*(eval_result_files or []), *sorted(folder.glob(EVAL_RESULTS_PATTERN))]
    eval_results = [load_eval_result(path) for path in dict.fromkeys(Path(p).resolve() for p in result_files)]
    token = resolve_token(token)
    api = HfApi(endpoint=endpoint, token=token)

    replaced = {}
    if checked.adapter_config is not None:
        with _hub_errors(api.endpoint, repo_id):
            config = _adapter_base_config(checked, api)
        base_models = [checked.base_model, *(base_models or [])[1:]]
        # Hub users' peft resolves the base model from adapter_config.json: make it the Hub id.
        adapter_config = {**checked.adapter_config, "base_model_name_or_path": checked.base_model}
        replaced["adapter_config.json"] = json.dumps(adapter_config, indent=2).encode()
    else:
        config = checked.config
        if not base_models:
            logger.warning("No --base_model given: the model card names no base model.")
    card = build_model_card(
        folder, repo_id, config, license=license, base_models=base_models, datasets=datasets, eval_results=eval_results,
        has_processor=len(modalities(config)) > 1, adapter_config=checked.adapter_config,
    )
    operations = upload_operations(folder, str(card), replaced)
    with _hub_errors(api.endpoint, repo_id):
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if private and not api.repo_info(repo_id).private:
            api.update_repo_settings(repo_id, private=True)
        kind = "adapter" if checked.adapter_config is not None else "model"
        commit_message = commit_message or f"Upload Uni-MoE {kind} with model card"
        commit = api.create_commit(repo_id, operations, commit_message=commit_message)
    logger.info("Pushed %d files of %s to %s", len(operations), folder, commit.commit_url)
    return commit


def push_space_to_hub(
    space_folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> CommitInfo:
    """Upload a folder written by `trl_scripts.hub.space.write_space` to the gradio Space `repo_id` (created if needed)
    in one commit; returns the commit. `private` makes the Space private (also when it already exists)."""
    check_repo_id(repo_id)
    api = HfApi(endpoint=endpoint, token=resolve_token(token))
    with _hub_errors(api.endpoint, repo_id):
        api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=True if private else None, exist_ok=True)
        if private and not api.repo_info(repo_id, repo_type="space").private:
            api.update_repo_settings(repo_id, private=True, repo_type="space")
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=space_folder, repo_type="space",
            commit_message=commit_message or "Upload the Uni-MoE chat app", ignore_patterns=["__pycache__/*", "*.pyc"],
        )
    logger.info("Pushed the Space %s to %s", space_folder, commit.commit_url)
    return commit


@dataclass
class PushToHubArguments:
    model: str = field(
        metadata={"help": "Saved model folder (save_pretrained of model and processor) or peft adapter folder."}
    )
    repo_id: str = field(metadata={"help": "Hub repository to create or update: ORG/NAME."})
    private: bool = field(default=False, metadata={"help": "Make the repository private."})
    eval_results: list[str] = field(
        default_factory=list,
        metadata={"help": "Results files of `python -m trl_scripts.evaluate` (eval_results*.json in the folder too)."},
    )
    base_model: list[str] = field(
        default_factory=list, metadata={"help": "Hub id(s) of the model(s) this one derives from."}
    )
    datasets: list[str] = field(default_factory=list, metadata={"help": "Hub ids or names of the training datasets."})
    license: str = field(
        default="apache-2.0", metadata={"help": "License id for the card (that of the base model's weights)."}
    )
    commit_message: str | None = None
    token: str | None = field(default=None, metadata={"help": "Hub token (defaults to HF_TOKEN or `hf auth login`)."})
    space: str | None = field(
        default=None,
        metadata={"help": "Also publish a gradio Space (ORG/NAME) running the chat app on the pushed model "
                  "(`trl_scripts.hub.space`); private with --private."},
    )


@command_line
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(PushToHubArguments).parse_args_into_dataclasses(args=argv)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            space_folder = _space_folder(args, Path(scratch)) if args.space else None  # checked before any upload
            commit = push_folder_to_hub(
                args.model, args.repo_id, private=args.private, token=args.token, eval_result_files=args.eval_results,
                license=args.license, base_models=args.base_model, datasets=args.datasets,
                commit_message=args.commit_message,
            )
            if space_folder is not None:
                space_commit = push_space_to_hub(space_folder, args.space, private=args.private, token=args.token)
    except (ValueError, FileNotFoundError, HubTokenError, HubConnectionError, HubRequestError) as error:
        # A refused push is the user's to fix: the message, not a traceback.
        sys.exit(f"push_to_hub: error: {error}")
    print(f"Pushed {args.model} to {commit.repo_url} (commit {commit.oid[:8]}): {commit.commit_url}")
    if space_folder is not None:
        print(f"Pushed the chat Space to {space_commit.repo_url} (commit {space_commit.oid[:8]})")


def _space_folder(args: PushToHubArguments, scratch: Path) -> Path:
    """The Space of `--space`, written under `scratch`: for a full model (an adapter has no processor to chat with)."""
    check_repo_id(args.space)
    if (Path(args.model) / "adapter_config.json").is_file():
        raise ValueError(f"--space needs a full model; {args.model} is a peft adapter (merge it and push the model)")
    if args.private:
        logger.warning("The model is private: give the Space an HF_TOKEN secret that can read %s", args.repo_id)
    return write_space(scratch / "space", args.repo_id)


if __name__ == "__main__":
    main()
