"""Throughput and latency of the OpenAI-compatible server (`unimoe-serve`) under concurrent clients, against the
same requests sent one at a time, all measured in the same run on the same server.

The server runs as its command line in a subprocess on a random-weight checkpoint of `--preset` (the `small`
preset: 8 layers, hidden 512, 4 experts top-2, CLIP ViT-L/14-336 tower); clients use the official `openai`
package. Every request generates exactly `--max_tokens` tokens (`min_new_tokens` through the request's
`generation_config`, transformers serve's extension), so that rows differ only in how they are scheduled. For
each prompt (`text`: a short question; `image`: one 336 px image, 576 soft tokens, plus the question):

- one at a time: `--requests` requests, each sent when the previous answer came back (the baseline);
- N concurrent clients (`--clients`): the same requests shared by N threads, each sending its next request when
  its previous answer came back; the server batches what arrives together into one `generate`;
- the same N clients against a second server started with `--max_batch_size 1` (requests serialised).

    python benchmarks/bench_serve.py [--preset small] [--requests 16] [--max_tokens 32] [--clients 1 4 8]

Columns: requests/s, p50 and p95 latency of one request (seconds, send to last byte), and requests/s relative to
one at a time.
"""

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import torch
from PIL import Image

from modeling_unimoe import UniMoEForCausalLM
from trl_scripts import load_preset, load_tiny_processor


REPO_ROOT = Path(__file__).resolve().parent.parent


def write_checkpoint(preset: str, folder: Path) -> None:
    """The preset with random weights and the offline tokenizer of the `tiny` preset, whose placeholder ids the
    config takes (the LM keeps the preset's vocabulary: ids past the tokenizer's decode to nothing)."""
    torch.manual_seed(0)
    config = load_preset(preset)
    tokenizer = load_tiny_processor().tokenizer
    for name in ("image", "video", "audio"):
        setattr(config, f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    UniMoEForCausalLM(config).eval().save_pretrained(folder)
    load_tiny_processor(config).save_pretrained(folder)


def image_uri(size: int = 336) -> str:
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def start_server(checkpoint: Path, max_batch_size: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "trl_scripts.serve", str(checkpoint), "--port", str(port), "--max_batch_size", str(max_batch_size)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).json().get("status") == "ok":
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)


def fixed_length(max_tokens: int) -> dict:
    """The request fields that make `unimoe-serve` generate exactly `max_tokens` tokens (transformers serve's
    `generation_config` extension)."""
    return {"generation_config": json.dumps({"min_new_tokens": max_tokens, "max_new_tokens": max_tokens, "do_sample": False})}


def run_clients(
    url: str, model: str, content, requests: int, clients: int, max_tokens: int, extra_body: dict | None = None
) -> tuple[float, list[float]]:
    """(wall seconds, per-request latencies) for `requests` requests shared by `clients` threads; `extra_body`: the
    server's fields for a fixed answer length (`fixed_length` by default)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    extra_body = fixed_length(max_tokens) if extra_body is None else extra_body
    latencies, lock, counter = [], threading.Lock(), iter(range(requests))

    def work():
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            start = time.perf_counter()
            response = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0,
                extra_body=extra_body,
            )
            assert response.usage.completion_tokens == max_tokens, response.usage
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=work) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, latencies


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / f"unimoe-{args.preset}"
        write_checkpoint(args.preset, checkpoint)
        prompts = {
            "text": "Describe a sunny day at the beach in a few sentences.",
            "image": [{"type": "image_url", "image_url": {"url": image_uri()}}, {"type": "text", "text": "What is in this image?"}],
        }
        servers = {name: start_server(checkpoint, size) for name, size in (("batched", 8), ("serialised", 1))}
        try:
            print(f"preset={args.preset} requests={args.requests} max_tokens={args.max_tokens} threads={torch.get_num_threads()} "
                  f"(server: {os.cpu_count()} cores shared with the clients)")
            header = f"{'prompt':>6} {'clients':>7} {'server':>31} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'vs one at a time':>16}"
            print(header)
            print("-" * len(header))
            for name, content in prompts.items():
                for _, url in servers.values():  # warm-up: first-call allocations, thread pools
                    run_clients(url, str(checkpoint), content, 2, 1, args.max_tokens)
                url = servers["batched"][1]
                wall, latencies = run_clients(url, str(checkpoint), content, args.requests, 1, args.max_tokens)
                baseline = args.requests / wall
                print(f"{name:>6} {1:>7} {'one at a time':>31} {baseline:>7.2f} {percentile(latencies, 50):>7.2f} "
                      f"{percentile(latencies, 95):>7.2f} {1.0:>16.2f}", flush=True)
                for clients in args.clients:
                    if clients == 1:
                        continue
                    for server_name, (_, url) in servers.items():
                        wall, latencies = run_clients(url, str(checkpoint), content, args.requests, clients, args.max_tokens)
                        rate = args.requests / wall
                        label = "batched (max 8)" if server_name == "batched" else "serialised (--max_batch_size 1)"
                        print(f"{name:>6} {clients:>7} {label:>31} {rate:>7.2f} {percentile(latencies, 50):>7.2f} "
                              f"{percentile(latencies, 95):>7.2f} {rate / baseline:>16.2f}", flush=True)
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(timeout=30)


if __name__ == "__main__":
    main()
