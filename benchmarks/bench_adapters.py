"""Benchmark serving LoRA adapters: `falconet serve` with 4 adapters vs the base alone.

Two servers over the same base checkpoint, both started up front and loaded in turn,
round by round (never side by side: an idle server waits without using a core, so each
round gets the machine's cores to itself):

- base: `falconet serve --model M`, every client asks for the base model;
- adapters: `falconet serve --model M --adapter a0=... --adapter a3=...`, client i asks
  for adapter i % 4, so every step packs rows of all four adapters (per-sequence LoRA,
  falconet/nn/lora.py).

Each server gets one warm-up request; then each of --rounds rounds runs base, then
adapters: --clients concurrent clients (the official `openai` AsyncOpenAI client,
/v1/completions, temperature 0, ignore_eos, token-id prompts of --prompt-len) send
--requests-per-client requests one after another. Aggregate tok/s = generated tokens of
all requests / wall time; the table gives each round and its ratio adapters / base, and
the median ratio (the issue's target: >= 0.8 at 16 clients): the machine's load drifts
over minutes, so a ratio of two runs far apart measures the drift too. Both servers run
with --no-speculative, so the ratio measures the LoRA updates alone.

The base is a random Falcon checkpoint built once with transformers (default: hidden
1024, 12 layers, 16 heads, multi-query, bf16, in .bench_cache/lora-falcon-...) or --model
DIR; the adapters are random PEFT-format folders (rank --rank on query_key_value, dense,
dense_h_to_4h and dense_4h_to_h) written next to it. `--smoke` runs a tiny model with 4
clients and a few tokens, to check the script end to end. Not used by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import build_tokenizer  # noqa: E402

TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
ADAPTERS = 4


def build_base(folder: Path, hidden: int, layers: int, heads: int, vocab: int) -> None:
    """A random Falcon-7B-shaped (multi-query) checkpoint in bf16, built once."""
    if (folder / "model.safetensors").is_file():
        return
    from transformers import FalconConfig, FalconForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    eos = build_tokenizer(folder, vocab)
    config = FalconConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, multi_query=True, parallel_attn=True, bias=False,
        max_position_embeddings=2048, bos_token_id=eos, eos_token_id=eos,
    )  # fmt: skip
    torch.manual_seed(0)
    FalconForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)


def write_adapter(folder: Path, base: Path, rank: int, seed: int) -> None:
    """A random LoRA adapter in PEFT's format (adapter_config.json + safetensors)."""
    config = json.loads((base / "config.json").read_text())
    C, H, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    D = C // H
    ffn = config.get("ffn_hidden_size") or 4 * C
    qkv = (H + 2) * D  # multi-query: H query heads, one K and one V head
    shapes = {"query_key_value": (qkv, C), "dense": (C, C), "dense_h_to_4h": (ffn, C),
              "dense_4h_to_h": (C, ffn)}  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for name, (n_out, n_in) in shapes.items():
            key = f"base_model.model.transformer.h.{i}.self_attention.{name}"
            if name.startswith("dense_"):
                key = f"base_model.model.transformer.h.{i}.mlp.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.02
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": list(TARGETS), "lora_dropout": 0.0, "bias": "none",
        "base_model_name_or_path": str(base),
    }))  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, adapters: dict[str, Path], port: int, threads: int):
    cmd = [sys.executable, "-m", "falconet", "serve", "--model", str(model), "--port", str(port),
           "--served-model-name", "base", "--max-batch", "16", "--no-speculative"]  # fmt: skip
    for name, folder in adapters.items():
        cmd += ["--adapter", f"{name}={folder}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit("falconet serve exited:\n" + proc.stderr.read().decode())
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("falconet serve did not become healthy")


async def run_clients(port: int, models: list[str], args: argparse.Namespace,
                      warm_up: bool = False) -> tuple[int, float]:  # fmt: skip
    """One round: every client's requests (the same prompts each round), or with
    `warm_up` one request. Returns (generated tokens, wall seconds)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                                max_retries=0, timeout=3600)  # fmt: skip
    g = torch.Generator().manual_seed(1)

    def prompt() -> list[int]:
        return torch.randint(10, args.prompt_vocab, (args.prompt_len,), generator=g).tolist()

    async def one(model: str, ids: list[int]) -> int:
        r = await client.completions.create(
            model=model, prompt=ids, max_tokens=args.max_tokens, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return r.usage.completion_tokens

    async def client_loop(i: int, prompts: list[list[int]]) -> int:
        return sum([await one(models[i % len(models)], p) for p in prompts])

    work = [[prompt() for _ in range(args.requests_per_client)] for _ in range(args.clients)]
    if warm_up:
        work = [[work[0][0]]]
    t0 = time.perf_counter()
    tokens = await asyncio.gather(*(client_loop(i, w) for i, w in enumerate(work)))
    wall = time.perf_counter() - t0
    await client.close()
    return sum(tokens), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", type=Path, default=None, help="a Falcon HF folder (default: build one)"
    )
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=5, help="base/adapters pairs, in turn")
    ap.add_argument("--smoke", action="store_true", help="a tiny model, 4 clients, 8 tokens")
    args = ap.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.heads, args.vocab = 64, 2, 4, 448
        args.clients, args.requests_per_client, args.prompt_len, args.max_tokens = 4, 1, 8, 8
        args.rounds = 1
    args.prompt_vocab = min(args.vocab, 400)  # ids the tokenizer covers, so replies decode
    cache = (
        REPO
        / ".bench_cache"
        / f"lora-falcon-h{args.hidden}-l{args.layers}-a{args.heads}-v{args.vocab}"
    )
    model = args.model or cache
    if args.model is None:
        build_base(model, args.hidden, args.layers, args.heads, args.vocab)
    adapters = {}
    for i in range(ADAPTERS):
        folder = cache / f"adapter-r{args.rank}-{i}"
        if not (folder / "adapter_config.json").is_file():
            write_adapter(folder, model, args.rank, seed=i)
        adapters[f"a{i}"] = folder
    runs = {"base": {}, f"{ADAPTERS} adapters": adapters}
    servers = {}
    try:
        for name, served in runs.items():
            port = free_port()
            servers[name] = (start_server(model, served, port, args.threads), port)
            asyncio.run(run_clients(port, list(served) or ["base"], args, warm_up=True))
        print(f"model {model} (rank {args.rank} adapters on {', '.join(TARGETS)}), "
              f"{args.clients} clients x {args.requests_per_client} requests, prompt "
              f"{args.prompt_len}, {args.max_tokens} tokens each")  # fmt: skip
        print("| round | base tok/s | adapters tok/s | ratio |\n|---|---|---|---|")
        ratios = []
        for r in range(args.rounds):
            rates = []
            for name, served in runs.items():
                tokens, wall = asyncio.run(
                    run_clients(servers[name][1], list(served) or ["base"], args)
                )
                rates.append(tokens / wall)
            ratios.append(rates[1] / rates[0])
            print(f"| {r + 1} | {rates[0]:.1f} | {rates[1]:.1f} | {ratios[-1]:.2f}x |", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
    print(f"median ratio adapters / base: {statistics.median(ratios):.2f}x (target >= 0.8x)")


if __name__ == "__main__":
    main()
