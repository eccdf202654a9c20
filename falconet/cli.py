"""The `falconet` command: generate, chat, serve, info, convert, train, perplexity, rag.

Every user error (missing path, not a Falcon checkpoint, bad flag values) prints one
line on stderr and exits 2; the library raises typed errors and this file turns them
into messages.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from falconet.errors import FalconetError
from falconet.tokenizer import FALLBACK_CHAT_STOP

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", "-m", default=None, help="HF Falcon folder (default: the embedded default model)"
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype; auto keeps the checkpoint's (compute is fp32 on CPU)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--quant", default=None, metavar="TYPE",
                   help="quantize a HF checkpoint while loading: q8_0, q5_1, q5_0, q4_1 or q4_0")  # fmt: skip


def _add_sampling_flags(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop-token-id", type=int, action="append", default=[], dest="stop_token_ids")
    g.add_argument("--ignore-eos", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="falconet", description="Run Falcon LLMs on your own machine.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="continue a prompt")
    gen.add_argument("prompt")
    _add_model_flags(gen)
    _add_sampling_flags(gen, max_tokens=64)
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")

    chat = sub.add_parser("chat", help="interactive chat (/reset clears history, /exit quits)")
    _add_model_flags(chat)
    _add_sampling_flags(chat, max_tokens=256)
    chat.add_argument("--system", default=None, help="system prompt")

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    _add_model_flags(serve)
    _add_serve_flags(serve)

    info = sub.add_parser("info", help="describe a model: variant, parameters, memory")
    _add_model_flags(info)

    from falconet.weights.gguf import WRITE_TYPES

    conv = sub.add_parser("convert", help="write a HF Falcon folder as a GGUF file for llama.cpp")
    conv.add_argument("model", help="Hugging Face Falcon folder")
    conv.add_argument("out", help="GGUF file to write")
    conv.add_argument("--type", dest="qtype", default="f16", choices=list(WRITE_TYPES),
                      help="weight type (default f16); quantized files keep the head in q8_0, as llama.cpp does")  # fmt: skip
    conv.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    train = sub.add_parser("train", help="train a small Falcon on your own text")
    _add_train_flags(train)

    ppl = sub.add_parser("perplexity", help="perplexity of a text file, as llama.cpp computes it")
    ppl.add_argument("textfile", help="UTF-8 text file (at least 2 x --ctx tokens)")
    _add_model_flags(ppl)
    ppl.add_argument("--ctx", type=int, default=None,
                     help="window in tokens; the second half of each is scored (default: min(512, model context))")  # fmt: skip
    ppl.add_argument("--batch", type=int, default=1, help="windows per forward pass")
    ppl.add_argument("--chunks", type=int, default=None,
                     help="score only the first N windows (llama.cpp's --chunks; default all)")  # fmt: skip

    from falconet.rag.cli import add_rag_parser

    add_rag_parser(sub, _Parser)
    return parser


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the server)")  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $FALCONET_API_KEY)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64,
                   help="sequences that may wait; beyond that requests get 429")  # fmt: skip
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens (prompt + generated) per sequence (default: the model's context)")  # fmt: skip
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the model folder or file name)")  # fmt: skip
    p.add_argument("--rag-store", default=None, metavar="DIR",
                   help="serve /v1/rag/* over the RAG store in DIR (default: RAG routes off)")  # fmt: skip
    p.add_argument("--rag-root", action="append", default=[], metavar="DIR",
                   help="a folder whose files clients may ingest by path (repeatable)")  # fmt: skip
    p.add_argument("--rag-max-upload-mb", type=int, default=50,
                   help="largest file accepted by POST /v1/rag/documents (default 50)")  # fmt: skip


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from falconet.train.trainer import VARIANTS, TrainSettings

    d = TrainSettings(data=[], out="x")
    p.add_argument(
        "data", nargs="+", help='text files, folders of .txt/.md/.html, or a JSONL of {"text": ...}'
    )
    p.add_argument("--out", "-o", required=True, help="output HF model folder")
    p.add_argument("--run-dir", default="", help="checkpoints and history (default: OUT.run)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument(
        "--tokenizer", default="", help="tokenizer.json or folder to use instead of training one"
    )
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--variant", choices=list(VARIANTS), default=d.variant)
    p.add_argument("--hidden", type=int, default=d.hidden_size, dest="hidden_size")
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip", type=float, default=d.clip)
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=d.dtype, help="training precision"
    )
    p.add_argument("--save-dtype", choices=["float32", "bfloat16"], default=d.save_dtype,
                   help="weight dtype of the output folder")  # fmt: skip
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-batches", type=int, default=d.eval_batches)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")


def _sampling(args: argparse.Namespace):
    from falconet.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        stop_token_ids=tuple(args.stop_token_ids),
        ignore_eos=args.ignore_eos,
    )


def _load(args: argparse.Namespace):
    from tqdm import tqdm

    import falconet

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:  # drawn only once loading has taken a second
            bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc="loading",
                delay=1.0,
                leave=False,
                file=sys.stderr,
            )
        bar.update(done - bar.n)

    try:
        return falconet.load(
            args.model, dtype=args.dtype, device=args.device, progress=progress,
            quant=getattr(args, "quant", None),
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()


def cmd_generate(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    params = _sampling(args)  # validate flags before the (slow) load
    llm = _load(args)
    if args.stream:
        for piece in llm.stream(args.prompt, params=params):
            out(piece)
        out("\n")
    else:
        out(llm.complete([args.prompt], params)[0].text + "\n")
    return 0


def cmd_chat(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    import dataclasses

    from falconet.errors import GenerationError

    params = _sampling(args)
    llm = _load(args)
    context = llm.config.max_position_embeddings
    if params.max_tokens >= context:
        raise FalconetError(
            f"--max-tokens {params.max_tokens} leaves no room for the conversation in the "
            f"model's {context}-token context; use a smaller value"
        )
    if llm.tokenizer.chat_template is None:
        params = dataclasses.replace(params, stop=(*params.stop, FALLBACK_CHAT_STOP))
    history: list[dict] = []
    out("falconet chat: /reset clears the history, Ctrl-C stops a reply, /exit or Ctrl-D quits\n")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            out("\n")
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history.clear()
            out("(history cleared)\n")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            ids = fit_history(llm, args.system, history, context - params.max_tokens)
        except GenerationError as e:
            history.pop()
            print(f"falconet: {e}", file=sys.stderr)
            continue
        out("falcon> ")
        reply = ""
        try:
            for piece in llm.stream(ids, params=params):
                reply += piece
                out(piece)
        except KeyboardInterrupt:  # stops this reply, not the session
            out(" [stopped]")
        out("\n")
        history.append({"role": "assistant", "content": reply.strip()})


def fit_history(llm, system: str | None, history: list[dict], budget: int) -> list[int]:
    """Prompt ids for the chat so far, dropping the oldest turns (never the system
    prompt or the newest message) to fit `budget` tokens."""
    from falconet.errors import GenerationError

    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids = llm.chat_prompt(messages)
        if len(ids) <= budget:
            return ids
        if len(history) <= 1:
            raise GenerationError(
                f"that message makes a {len(ids)}-token prompt; with --max-tokens the budget is "
                f"{budget} tokens: send a shorter message or lower --max-tokens"
            )
        del history[: 2 if len(history) > 2 else 1]  # the oldest user+assistant turn


def quant_kernels() -> str:
    import torch

    from falconet.quant import kernels

    if kernels.native is None:
        return "PyTorch fallback (the compiled kernels were not built)"
    return f"compiled CPU kernels ({kernels.native.simd()}, {torch.get_num_threads()} threads)"


def cmd_serve(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    import os
    from pathlib import Path

    from falconet.llm import DEFAULT_MODEL_DIR
    from falconet.server.serve import ServerSettings, serve

    name = args.served_model_name
    if name is None:
        name = (DEFAULT_MODEL_DIR if args.model is None else Path(args.model).expanduser()).name
        name = name or Path(args.model).expanduser().resolve().name  # "." or "~/m/"
    api_key = args.api_key
    if api_key is None:  # an unset or empty variable means no key
        api_key = os.environ.get("FALCONET_API_KEY") or None
    settings = ServerSettings(
        model_name=name, host=args.host, port=args.port, api_key=api_key,
        max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
        rag_store=args.rag_store, rag_roots=tuple(args.rag_root),
        rag_max_upload_mb=args.rag_max_upload_mb,
    )  # fmt: skip
    llm = _load(args)
    serve(llm, settings, lambda line: print(line, file=sys.stderr, flush=True))
    return 0


def cmd_info(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    llm = _load(args)
    c, m = llm.config, llm.model
    kv_bytes = c.kv_cache_bytes_per_token(m.compute_dtype.itemsize)
    mha_bytes = (
        2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * m.compute_dtype.itemsize
    )
    rows = [
        ("path", str(llm.path)),
        ("variant", c.variant),
        ("parameters", f"{m.num_parameters():,}"),
        ("weights", f"{m.weight_bytes():,} bytes ({m.storage_summary()}; compute {m.compute_dtype})"),
        ("kernels", quant_kernels()),
        ("layers / hidden / heads / kv heads", f"{c.num_hidden_layers} / {c.hidden_size} / {c.num_attention_heads} / {c.kv_heads}"),
        ("position", "ALiBi" if c.alibi else f"rotary theta={c.rope_theta:g}" + (f", {c.rope_scaling_type} x{c.rope_scaling_factor:g}" if c.rope_scaling_type else "")),
        ("context (max_position_embeddings)", str(c.max_position_embeddings)),
        ("vocab", f"{c.vocab_size} (tokenizer {llm.tokenizer.vocab_size})"),
        ("KV cache per token", f"{kv_bytes:,} bytes" + (f" ({mha_bytes // kv_bytes}x smaller than full MHA)" if mha_bytes > kv_bytes else "")),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        out(f"{k:<{width}}  {v}\n")
    return 0


def cmd_convert(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    from tqdm import tqdm

    from falconet.weights.gguf import convert_hf_to_gguf

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", delay=1.0,
                       leave=False, file=sys.stderr)  # fmt: skip
        bar.update(done - bar.n)

    try:
        convert_hf_to_gguf(args.model, args.out, args.qtype, progress, overwrite=args.overwrite)
    finally:
        if bar is not None:
            bar.close()
    out(f"wrote {args.out} ({args.qtype})\n")
    return 0


def cmd_train(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    import dataclasses

    import torch
    from tqdm import tqdm

    from falconet.train.trainer import Trainer, TrainSettings

    names = {f.name for f in dataclasses.fields(TrainSettings)} - {"extra"}
    settings = TrainSettings(**{k: v for k, v in vars(args).items() if k in names})
    if args.threads < 0:
        raise FalconetError("--threads must be >= 0 (0: PyTorch's default)")
    if args.threads:
        torch.set_num_threads(args.threads)
    bar = None

    def on_step(record: dict) -> None:
        nonlocal bar
        if bar is None:  # drawn from the first step on, so setup errors stay one line
            bar = tqdm(total=settings.steps, initial=record["step"] - 1, desc="train", unit="step",
                       dynamic_ncols=True, file=sys.stderr)  # fmt: skip
        post = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tok_s']:.0f}"}
        if "val_ppl" in record:
            post["val_ppl"] = f"{record['val_ppl']:.1f}"
        bar.set_postfix(post, refresh=False)
        bar.update(record["step"] - bar.n)

    def log(msg: str) -> None:
        tqdm.write(f"falconet: {msg}", file=sys.stderr)

    trainer = Trainer(
        settings, resume=args.resume, overwrite=args.overwrite, log=log, on_step=on_step
    )
    try:
        final = trainer.run()
    finally:
        if bar is not None:
            bar.close()
    summary = f"step {final['step']}: train loss {final['loss']:.4f}"
    if "val_loss" in final:
        summary += f", held-out loss {final['val_loss']:.4f} (perplexity {final['val_ppl']:.2f})"
    out(f"{summary}\nwrote {settings.out}\n")
    return 0


def cmd_perplexity(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    from falconet.perplexity import DEFAULT_CTX, check_window, perplexity, read_text, tokenize_text

    check_window(DEFAULT_CTX if args.ctx is None else args.ctx, args.batch)  # before the load
    if args.chunks is not None and args.chunks < 1:
        raise FalconetError(f"--chunks must be at least 1, got {args.chunks}")
    text = read_text(args.textfile)
    llm = _load(args)
    ctx = min(DEFAULT_CTX, llm.config.max_position_embeddings) if args.ctx is None else args.ctx
    ids = tokenize_text(llm.tokenizer, text)
    r = perplexity(llm, ids, ctx, args.batch, lambda i, n, ppl: out(f"[{i}]{ppl:.4f},"),
                   chunks=args.chunks)  # fmt: skip
    out(f"\nFinal estimate: PPL = {r.ppl:.4f} +/- {r.uncertainty:.5f}\n")
    out(f"tokens scored: {r.tokens_scored} of {len(ids)} (the last {ctx - ctx // 2 - 1} "
        f"of each of {r.n_chunks} windows of {ctx})\n")  # fmt: skip
    return 0


def cmd_rag(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    from falconet.rag.cli import cmd_rag

    return cmd_rag(args, out)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "info": cmd_info,
            "train": cmd_train, "convert": cmd_convert, "perplexity": cmd_perplexity,
            "rag": cmd_rag}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    def out(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args, out)
    except _UsageError as e:
        print(f"falconet: error: {e}", file=sys.stderr)
    except FalconetError as e:
        print(f"falconet: error: {e}", file=sys.stderr)
    except OSError as e:  # the machine's, not the user's: a full disk, a vanished file
        print(f"falconet: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
