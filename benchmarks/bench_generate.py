"""Benchmark falconet against transformers on CPU: prefill, decode, load memory, roofline.

Builds (once, cached) a randomly initialised model -- by default Falcon-7B's design
scaled down to ~1.15 B parameters (hidden 2048, 24 layers, 32 heads of 64, multi-query,
parallel attention, vocab 65,024, no biases); with --arch falcon3 Falcon3-1B's shape
(1.67 B) -- saved in bf16 safetensors with a tiny byte-level BPE tokenizer, then
measures side by side, at each requested dtype, falconet two ways (falconet_runners.py)
and transformers:

- prefill tokens/s: a random --prompt-len prompt up to its first token (falconet
  direct: `models.dense.prefill` into a static `KVCache`; falconet API: the engine
  `LLM.stream` runs, submit -> first token; transformers: one forward with
  use_cache=True and logits_to_keep=1, as `generate()` does);
- decode tokens/s: --decode-tokens greedy steps after it (direct: a `decode_step` loop;
  API: the engine's next tokens; transformers: a manual loop feeding back its cache --
  not `generate()`, so every side does the same work);
- peak RSS growth while loading, and while loading + prefill + one decode step, each
  loader in a fresh subprocess, as a multiple of the weight bytes at that dtype;
- the decode roofline: weight bytes read per token vs the memory read bandwidth
  measured here (a sum over a large fp32 tensor).

Timings are medians over --repeats, after one warm-up, the three runners alternating
run by run (all loaded at once) so a noisy machine's drift hits them alike. This
script is not used by the tests.

    python benchmarks/bench_generate.py                     # full size (~2.3 GB bf16 checkpoint)
    python benchmarks/bench_generate.py --hidden 256 --layers 2 --heads 4 --vocab 4096 \\
        --cache-dir /tmp/bench_small --repeats 1            # smoke run
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recurrent_shapes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The shapes a checkpoint can be built in, by architecture; each flag overrides one key.
# falcon: Falcon-7B's design (multi-query, parallel attention, no biases) scaled down.
DEFAULT_SHAPE = {"hidden": 2048, "layers": 24, "heads": 32, "vocab": 65024}
# falcon3: Falcon3-1B's shape (tiiuae/Falcon3-1B-Base config.json): GQA 8q/4kv, head_dim
# 256 (not hidden/heads), SwiGLU, untied head; 1.67 B parameters.
FALCON3_1B_SHAPE = {
    "hidden": 2048,
    "layers": 18,
    "heads": 8,
    "kv_heads": 4,
    "head_dim": 256,
    "intermediate": 8192,
    "vocab": 131072,
}
# falcon_h1, falcon_mamba: Falcon-H1-0.5B's shape, Falcon-Mamba-7B's layers (recurrent_shapes.py).
SHAPES = {"falcon": DEFAULT_SHAPE, "falcon3": FALCON3_1B_SHAPE, **recurrent_shapes.RECURRENT_SHAPES}
SHORT = {"hidden": "h", "layers": "l", "heads": "a", "kv_heads": "k", "head_dim": "d",
         "intermediate": "i", "vocab": "v", **recurrent_shapes.SHORT}  # fmt: skip
DEFAULT_CACHE = REPO / ".bench_cache" / "falcon-1b-mq"
DEFAULT_CACHES = {
    "falcon": DEFAULT_CACHE,
    "falcon3": REPO / ".bench_cache" / "falcon3-1b",
    **{a: REPO / ".bench_cache" / n for a, n in recurrent_shapes.CACHE_NAMES.items()},
}
SEED = 0
DTYPES = {"bf16": ("bfloat16", torch.bfloat16), "fp32": ("float32", torch.float32)}
EOS = "<|endoftext|>"
META = "bench_meta.json"  # written last: its presence marks a complete checkpoint


# ---- checkpoint ---------------------------------------------------------------------
def arch_of(args: argparse.Namespace) -> str:
    return getattr(args, "arch", None) or "falcon"  # bench_server passes no arch


def shape_of(args: argparse.Namespace) -> dict:
    arch = arch_of(args)
    shape = {key: getattr(args, key) for key in SHAPES[arch]}
    if arch != "falcon":  # Falcon checkpoints cached before --arch existed carry no arch key
        shape["arch"] = arch
    return {**shape, "seed": SEED}


def add_shape_flags(ap: argparse.ArgumentParser) -> None:
    """--arch and one flag per shape key; a key left out takes the arch's default
    (fill_shape_defaults, after parsing)."""
    ap.add_argument("--arch", choices=list(SHAPES), default="falcon")
    keys = dict.fromkeys(k for shape in SHAPES.values() for k in shape)
    for key in keys:
        defaults = ", ".join(f"{a} {shape[key]}" for a, shape in SHAPES.items() if key in shape)
        ap.add_argument("--" + key.replace("_", "-"), type=int, help=f"default: {defaults}")


def fill_shape_defaults(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    shape = SHAPES[args.arch]
    for key, value in vars(args).copy().items():
        if key in shape and value is None:
            setattr(args, key, shape[key])
        elif key not in shape and value is not None and any(key in s for s in SHAPES.values()):
            ap.error(f"--{key.replace('_', '-')} is not a shape key of --arch {args.arch}")
    if args.arch == "falcon" and args.hidden % args.heads:
        ap.error("--hidden must be a multiple of --heads")
    if args.arch == "falcon3" and args.heads % args.kv_heads:
        ap.error("--heads must be a multiple of --kv-heads")
    recurrent_shapes.check_shape(ap, args)
    if args.vocab < 512:
        ap.error("--vocab must be at least 512 (the tokenizer alone holds 257 tokens)")


def cache_dir_for(args: argparse.Namespace) -> Path:
    if args.cache_dir:
        return Path(args.cache_dir)
    arch = arch_of(args)
    if all(getattr(args, k) == v for k, v in SHAPES[arch].items()):
        return DEFAULT_CACHES[arch]
    name = "-".join(f"{SHORT[k]}{getattr(args, k)}" for k in SHAPES[arch])
    return REPO / ".bench_cache" / f"{arch}-{name}"  # e.g. falcon-h256-l2-a4-v4096


def ensure_checkpoint(args: argparse.Namespace, folder: Path) -> None:
    meta = folder / META
    want = shape_of(args)
    if meta.is_file():
        have = json.loads(meta.read_text())
        if have != want:
            sys.exit(
                f"{folder} holds a model of shape {have}, not {want}; pass another --cache-dir "
                "or delete that folder"
            )
        return
    print(f"building a random checkpoint {want} in {folder} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    # A subprocess, so the fp32 init buffers never inflate this process's memory.
    run_worker(["build", "--cache-dir", str(folder)] + shape_flags(args), args.threads)
    print(f"built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def shape_flags(args: argparse.Namespace) -> list[str]:
    arch = arch_of(args)
    flags = ["--arch", arch]
    for key in SHAPES[arch]:
        flags += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    return flags


def build_tokenizer(folder: Path, vocab: int) -> int:
    """A tiny byte-level BPE (prompts are token ids, so its size does not matter)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = (
        "Falcon is a family of decoder-only language models. The falcon flies over the "
        "valley, and the engine decodes one token at a time, reading every weight once. "
    ) * 8
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab, 400),
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS, "bos_token": EOS}))
    return tok.token_to_id(EOS)


def hf_config(args: argparse.Namespace, eos_id: int):
    """The transformers config of the --arch checkpoint."""
    if arch_of(args) in recurrent_shapes.RECURRENT_SHAPES:
        return recurrent_shapes.hf_config(args, eos_id)
    if arch_of(args) == "falcon3":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            head_dim=args.head_dim,
            hidden_act="silu",
            rope_theta=1000042.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
        )
    from transformers import FalconConfig

    return FalconConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        multi_query=True,
        parallel_attn=True,
        new_decoder_architecture=False,
        bias=False,
        alibi=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )


def worker_build(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    folder = Path(args.cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META).unlink(missing_ok=True)
    eos_id = build_tokenizer(folder, args.vocab)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(hf_config(args, eos_id)).eval()
    if arch_of(args) in recurrent_shapes.RECURRENT_SHAPES:
        recurrent_shapes.unit_gain(model, SEED)
    model.to(torch.bfloat16)
    model.save_pretrained(folder)
    (folder / META).write_text(json.dumps(shape_of(args)))
    return {"params": sum(p.numel() for p in model.parameters())}


# ---- subprocess workers --------------------------------------------------------------
def run_worker(argv: list[str], threads: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        *argv,
        "--threads",
        str(threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def proc_status() -> dict[str, int]:
    """VmHWM / VmRSS / RssAnon / RssFile of this process, in bytes."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    if "VmHWM" not in out:  # not Linux: ru_maxrss (bytes on macOS, KiB elsewhere)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["VmHWM"] = rss if sys.platform == "darwin" else rss * 1024
    return out


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.nbytes for p in {id(p): p for p in model.parameters()}.values())


def worker_rss(args: argparse.Namespace) -> dict:
    """Peak RSS growth of one loader in this fresh process (torch + library already imported)."""
    dtype_name, torch_dtype = DTYPES[args.dtype]
    if args.engine == "falconet":
        import falconet
        from falconet.models.dense import decode_step, prefill
        from falconet.nn.cache import KVCache
    else:
        from transformers import AutoModelForCausalLM  # noqa: F401  (import before the baseline)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    ids = torch.randint(
        0, args.vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(1)
    )
    # torch's one-time setup (~80 MB the first time a module is built on the meta device,
    # as both loaders do; first kernels) is not part of what a loader costs per weight.
    with torch.device("meta"):
        torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Embedding(8, 8)
    for dt in (torch.float32, torch.bfloat16):
        torch.nn.functional.linear(torch.ones(16, 8, dtype=dt), torch.ones(8, 8, dtype=dt))
    gc.collect()
    before = proc_status()
    if args.engine == "falconet":
        llm = falconet.load(args.cache_dir, dtype=dtype_name)
        model = llm.model
    else:
        model = hf_load(args.cache_dir, torch_dtype)
    loaded = proc_status()
    with torch.inference_mode():
        if args.engine == "falconet":
            cache = KVCache(model.config, 1, args.prompt_len + 1, model.compute_dtype, model.device)
            logits = prefill(model, ids, torch.ones_like(ids, dtype=torch.bool), cache)
            decode_step(model, logits.argmax(-1), cache)
        else:
            out = model(input_ids=ids, use_cache=True, **hf_keep_last(model))
            model(
                input_ids=out.logits[:, -1].argmax(-1, keepdim=True),
                use_cache=True,
                **{hf_cache_kw(model): hf_cache(out)},
            )
    ran = proc_status()
    return {
        "weight_bytes": param_bytes(model),
        "load_growth": loaded["VmHWM"] - before["VmHWM"],
        "run_growth": ran["VmHWM"] - before["VmHWM"],
        "anon_growth": ran.get("RssAnon", 0) - before.get("RssAnon", 0),
        "file_growth": ran.get("RssFile", 0) - before.get("RssFile", 0),
    }


# ---- transformers helpers -------------------------------------------------------------
def hf_load(folder, torch_dtype: torch.dtype):
    import transformers
    from transformers import AutoModelForCausalLM

    # transformers 5 renamed torch_dtype= to dtype= (the old name still works, with a warning).
    kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="sdpa", **{kw: torch_dtype}
    )
    return model.eval()


def hf_cache_kw(model) -> str:
    # transformers 5 renamed past_key_values= to cache= (deprecated alias until 5.40).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def hf_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def hf_keep_last(model) -> dict:
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


# ---- timing ---------------------------------------------------------------------------
def measure_bandwidth(gib: float, runs: int = 5) -> float:
    """Memory read bandwidth in bytes/s: median time of a sum over a `gib` GiB fp32 tensor."""
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)  # ones: every page touched
    x.sum()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    nbytes = x.nbytes
    del x
    return nbytes / statistics.median(times)


class TransformersRunner:
    def __init__(self, folder: Path, torch_dtype: torch.dtype, ids: torch.Tensor, args) -> None:
        self.model = hf_load(folder, torch_dtype)
        self.cache_kw, self.keep = hf_cache_kw(self.model), hf_keep_last(self.model)
        self.ids, self.D = ids, args.decode_tokens

    def run(self) -> tuple[float, float, list[int]]:
        model = self.model
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(input_ids=self.ids, use_cache=True, **self.keep)
            t1 = time.perf_counter()
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens = [int(tok)]
            for _ in range(self.D):
                out = model(input_ids=tok, use_cache=True, **{self.cache_kw: hf_cache(out)})
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(tok))
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1, tokens


def bench_side_by_side(runners: dict, args) -> dict[str, dict]:
    """Alternate the runners run by run (after one warm-up each), so drift in a noisy
    machine's speed hits them all alike; medians over --repeats. Each runner's `run()`
    gives (prefill s, decode s, the --decode-tokens + 1 greedy tokens)."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
    tokens: dict[str, list[int]] = {}
    for i in range(args.repeats + 1):
        for name, runner in runners.items():
            pre, dec, tokens[name] = runner.run()
            if i:  # the first round is the warm-up
                times[name].append((pre, dec))
    P, D = args.prompt_len, args.decode_tokens
    return {
        name: {
            "prefill": P / statistics.median(t[0] for t in times[name]),
            "decode": D / statistics.median(t[1] for t in times[name]),
            "tokens": tokens[name],
        }
        for name in runners
    }


# ---- report ---------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e9 else f"{n / 1e6:.0f} MB"


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def describe_shape(args: argparse.Namespace) -> str:
    if arch_of(args) in recurrent_shapes.RECURRENT_SHAPES:
        return recurrent_shapes.describe(args)
    if arch_of(args) == "falcon3":
        return (
            f"Falcon3-shaped Llama: hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
            f"/ {args.kv_heads} KV heads of {args.head_dim}, intermediate {args.intermediate}, "
            f"vocab {args.vocab}, untied head"
        )
    return (
        f"Falcon-7B-shaped: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"multi-query, parallel attention, vocab {args.vocab}"
    )


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "—"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_flags(ap)
    ap.add_argument(
        "--cache-dir",
        default=None,
        help="checkpoint folder (default: .bench_cache/falcon-1b-mq or falcon3-1b for the "
        "default shapes)",
    )
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp32")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    ap.add_argument("--bw-gib", type=float, default=1.0, help="size of the bandwidth-probe tensor")
    ap.add_argument("--skip-rss", action="store_true", help="skip the load-memory subprocesses")
    # internal: run one step in a fresh process and print a JSON line
    ap.add_argument("--worker", choices=["build", "rss"], help=argparse.SUPPRESS)
    ap.add_argument("--engine", choices=["falconet", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--dtype", choices=list(DTYPES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    fill_shape_defaults(ap, args)

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    if args.worker:
        result = worker_build(args) if args.worker == "build" else worker_rss(args)
        print(json.dumps(result))
        return

    if args.repeats < 1 or args.decode_tokens < 1 or args.prompt_len < 1:
        ap.error("--repeats, --decode-tokens and --prompt-len must be positive")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"--dtypes: {d!r} is not one of {', '.join(DTYPES)}")

    import transformers
    from falconet_runners import APIRunner, DirectRunner
    from transformers.utils import logging as hf_logging

    import falconet

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder = cache_dir_for(args)
    ensure_checkpoint(args, folder)
    ids = torch.randint(
        0, args.vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(1)
    )

    bw = measure_bandwidth(args.bw_gib)
    print(f"memory read bandwidth {bw / 1e9:.1f} GB/s", file=sys.stderr, flush=True)

    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    params = 0
    for d in dtypes:
        dtype_name, torch_dtype = DTYPES[d]
        rss = {}
        if not args.skip_rss:
            for engine in ("falconet", "transformers"):
                print(f"[{d}] peak RSS of the {engine} loader ...", file=sys.stderr, flush=True)
                rss[engine] = run_worker(
                    ["rss", "--engine", engine, "--dtype", d, "--cache-dir", str(folder),
                     "--vocab", str(args.vocab), "--prompt-len", str(args.prompt_len)],
                    args.threads,
                )  # fmt: skip
        print(
            f"[{d}] timing falconet (direct and API) and transformers, alternating ...",
            file=sys.stderr,
            flush=True,
        )
        llm = falconet.load(folder, dtype=dtype_name)
        hf = TransformersRunner(folder, torch_dtype, ids, args)
        prompt = ids[0].tolist()
        runners = {
            "direct": DirectRunner(llm, prompt, args.decode_tokens),
            "api": APIRunner(llm, prompt, args.decode_tokens),
            "transformers": hf,
        }
        res = bench_side_by_side(runners, args)
        fn, api, ref = res["direct"], res["api"], res["transformers"]
        fn_bytes, hf_bytes = llm.model.weight_bytes(), param_bytes(hf.model)
        params = sum(p.numel() for p in {id(p): p for p in hf.model.parameters()}.values())
        compute = str(llm.model.compute_dtype).replace("torch.", "")
        weights = str(llm.model.lm_head.weight.dtype).replace("torch.", "")
        cache_kw = hf.cache_kw
        del runners, res, llm, hf
        gc.collect()

        P, D = args.prompt_len, args.decode_tokens
        for key, label in (
            ("prefill", f"prefill tok/s ({P}-token prompt)"),
            ("decode", f"decode tok/s ({D} tokens)"),
        ):
            a, b, c = fn[key], api[key], ref[key]
            rows.append((label, d, num(a), num(b), num(c), ratio(b, a), ratio(a, c), ratio(b, c)))
        roof_fn, roof_hf = bw / fn_bytes, bw / hf_bytes
        rows.append(
            ("decode roofline tok/s (bandwidth / weight bytes)", d,
             num(roof_fn), num(roof_fn), num(roof_hf), "—", "—", "—")
        )  # fmt: skip
        rows.append(
            ("decode % of roofline", d, f"{100 * fn['decode'] / roof_fn:.0f}%",
             f"{100 * api['decode'] / roof_fn:.0f}%", f"{100 * ref['decode'] / roof_hf:.0f}%",
             "—", "—", "—")
        )  # fmt: skip
        for key, label in (
            ("load_growth", "peak RSS growth, load / weight bytes"),
            ("run_growth", "peak RSS growth, load+prefill+1 step / weight bytes"),
        ):
            if rss:
                a = rss["falconet"][key] / rss["falconet"]["weight_bytes"]
                b = rss["transformers"][key] / rss["transformers"]["weight_bytes"]
                rows.append(
                    (label, d, f"{a:.2f}× ({gb(rss['falconet'][key])})", "—",
                     f"{b:.2f}× ({gb(rss['transformers'][key])})", "—", ratio(a, b), "—")
                )  # fmt: skip
        if rss:
            notes.append(
                f"{d}: after the first token, RSS grew by anon {gb(rss['falconet']['anon_growth'])} + file-backed "
                f"{gb(rss['falconet']['file_growth'])} (falconet) vs anon {gb(rss['transformers']['anon_growth'])} + "
                f"file-backed {gb(rss['transformers']['file_growth'])} (transformers); file-backed pages are the "
                "memory-mapped checkpoint, shared with the page cache"
            )
        notes.append(
            f"{d}: weights {gb(fn_bytes)} (falconet, {weights} weights, {compute} compute) / "
            f"{gb(hf_bytes)} (transformers, {dtype_name} compute); greedy tokens: direct and "
            f"transformers agree on the first {common_prefix(fn['tokens'], ref['tokens'])} of "
            f"{D + 1}, API and direct on the first {common_prefix(api['tokens'], fn['tokens'])} "
            f"of {D + 1}; transformers cache kwarg: {cache_kw}="
        )

    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print()
    print(
        f"`{cmd}` — torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{args.threads} threads, CPU: {cpu_model()} ({os.cpu_count()} logical cores), "
        f"memory read bandwidth {bw / 1e9:.1f} GB/s, model {folder.name} "
        f"({describe_shape(args)}; {params / 1e9:.3f} B parameters)"
    )
    print()
    print(
        "falconet direct: models.dense.prefill/decode_step into a static KVCache; falconet API: "
        "the engine LLM.stream runs (prefill = time to the first token)"
    )
    print()
    header = ("metric", "dtype", "falconet direct", "falconet API", "transformers",
              "API / direct", "direct / transformers", "API / transformers")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()
    for n in notes:
        print(f"- {n}")


if __name__ == "__main__":
    main()
