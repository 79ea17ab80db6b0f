"""The command line the server and the chat app share: the checkpoint (first positional argument or `--model`),
where to listen, and how to load it."""

from dataclasses import dataclass, field

from transformers import HfArgumentParser

from ..loading import DTYPES, EXPERTS_IMPLEMENTATIONS, QUANTIZATIONS, model_kwargs


@dataclass
class ServingArguments:
    model: str | None = field(
        default=None, metadata={"help": "Checkpoint folder or Hub repo id (also the first positional argument)."}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1... (default: cuda when available)."})
    dtype: str = field(default="auto", metadata={"help": f"Weights dtype: {', '.join(DTYPES)}."})
    quantization: str = field(
        default="none",
        metadata={"help": f"{', '.join(QUANTIZATIONS)}: int8 runs the language model in int8 (quant_method unimoe_int8)."},
    )
    experts_implementation: str = field(
        default="default",
        metadata={"help": f"{', '.join(EXPERTS_IMPLEMENTATIONS)}: the experts kernel (default: transformers' choice, "
                  "grouped_mm; eager is the fastest float32 kernel on CPU, docs/benchmarks.md)."},
    )


def parse_serving_arguments(arguments_class: type, argv: list[str] | None, command: str):
    """`arguments_class` (a `ServingArguments`) from the command line, the checkpoint given as the first positional
    argument or `--model`. Errors (no checkpoint, two, an unknown option, a port out of range) name the problem."""
    args, rest = HfArgumentParser(arguments_class).parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    positional = [item for item in rest if not item.startswith("-")]
    unknown = [item for item in rest if item.startswith("-")]
    if unknown:
        raise ValueError(f"unknown option(s): {' '.join(unknown)}")
    if len(positional) > 1 or (positional and args.model is not None):
        given = [*positional, *([args.model] if args.model else [])]
        raise ValueError(f"give one checkpoint (DIR or --model), got {given}")
    if positional:
        args.model = positional[0]
    if args.model is None:
        raise ValueError(f"give the checkpoint: {command} DIR (a folder written by save_pretrained or a Hub repo id)")
    model_kwargs(args.quantization, args.experts_implementation)  # an unknown value: the error names the choices
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    return args
