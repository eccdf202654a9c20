"""What every `falconet` command shares: the one-line error parser, the model and
sampling flags, and loading a model with a progress bar."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

EXIT_USAGE = 2

Out = Callable[[str], None]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(message)


class UsageError(Exception):
    pass


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="HF Falcon folder (default: the embedded model; chat and rag ask: its answering sibling)",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype. auto keeps the checkpoint's: for a bf16 (fp16) checkpoint "
                   "every linear layer rounds its inputs and outputs to bf16 (fp16), the rest "
                   "computes in fp32 on CPU and in bf16 (fp16) on GPU. float32 computes all in "
                   "fp32: the logits and logprobs transformers gives in fp32")  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--quant", default=None, metavar="TYPE",
                   help="quantize a HF checkpoint while loading: q8_0, q5_1, q5_0, q4_1, q4_0, or one of llama.cpp's K-quant mixes (q4_k_m, q5_k_m, q6_k, ...)")  # fmt: skip


def add_tp_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallelism: split the model's heads, MLP and vocabulary over N "
                   "processes that this command starts (gloo on CPU, NCCL with --device cuda "
                   "and N GPUs); under torchrun, N is the job's total process count")  # fmt: skip


def add_speculative_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=True,
                   help="draft tokens by looking up the text so far in the prompt (or with "
                   "--draft) and check them in one forward: the same output, faster where "
                   "answers copy from the prompt (RAG, code edits). Default on; off by itself "
                   "for Falcon-Mamba and Falcon-H1 (a recurrent state cannot be rolled back) "
                   "and for requests with structured output")  # fmt: skip
    g.add_argument("--draft", default=None, metavar="MODEL",
                   help="a smaller model with the same tokenizer that drafts the tokens "
                   "(e.g. Falcon3-1B for Falcon3-10B), loaded like --model")  # fmt: skip


def add_sampling_flags(
    p: argparse.ArgumentParser, max_tokens: int | None, help: str | None = None
) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=help or f"tokens to generate (default {max_tokens})")  # fmt: skip
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


def sampling_params(args: argparse.Namespace, fitted: bool = False):
    """The sampling flags as SamplingParams. fitted: no --max-tokens was given and the
    command sets each request's length itself (a stand-in of 1 until then)."""
    from falconet.sampling import SamplingParams

    return SamplingParams(
        max_tokens=1 if fitted else args.max_tokens,
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
        logprobs=getattr(args, "logprobs", None),  # only `generate` has the flag
    )


def load_model(args: argparse.Namespace, answering: bool = False):
    """The model the flags name (with no --model: the embedded one, its answering sibling
    for commands that answer: chat, rag ask), with the speculative-decoding flags applied
    where the command has them (a --draft model loads with the same dtype and device)."""
    import falconet
    from falconet.llm import default_model_path

    tp = getattr(args, "tp", 1)
    if tp != 1:
        follow_if_not_rank0(args, tp)
    draft_path = getattr(args, "draft", None)
    if draft_path is not None and not args.speculative:
        raise UsageError("--draft drafts for speculative decoding; drop --no-speculative")
    progress, close = progress_bar("loading")
    try:
        model = default_model_path(answering) if args.model is None else args.model
        llm = falconet.load(
            model, dtype=args.dtype, device=args.device, progress=progress,
            quant=getattr(args, "quant", None), tp=tp, on_worker_failure=worker_failed,
        )  # fmt: skip
    finally:
        close()
    workers = getattr(llm.model, "workers", None)
    if workers is not None:
        pids = ", ".join(f"rank {i + 1} pid {pid}" for i, pid in enumerate(workers.pids()))
        print(f"falconet: tensor parallel over {tp} ranks: rank 0 pid {os.getpid()}, {pids}",
              file=sys.stderr, flush=True)  # fmt: skip
    if hasattr(args, "speculative"):
        draft = None
        if draft_path is not None:
            progress, close = progress_bar("loading the draft model")
            try:
                draft = falconet.load(draft_path, dtype=args.dtype, device=args.device,
                                      progress=progress)  # fmt: skip
            finally:
                close()
        llm.set_speculative(args.speculative, draft)
    return llm


def launched_by_torchrun() -> bool:
    from falconet.parallel import launched_by_torchrun

    return launched_by_torchrun()


def follow_if_not_rank0(args: argparse.Namespace, tp: int) -> None:
    """Under `torchrun`, ranks 1.. load their shard and follow rank 0's steps; the command
    ends for them when rank 0 stops."""
    if not launched_by_torchrun() or int(os.environ["RANK"]) == 0:
        return
    from pathlib import Path

    import torch

    from falconet.llm import resolve_dtypes
    from falconet.parallel import follow_checkpoint, source_config

    if args.model is None:
        raise UsageError("--tp under torchrun needs --model (a Hugging Face folder or GGUF file)")
    folder = Path(args.model).expanduser()
    device = torch.device(args.device)
    dtype, compute = resolve_dtypes(args.dtype, source_config(folder), device)
    follow_checkpoint(folder, tp, dtype, compute, device, getattr(args, "quant", None))
    sys.exit(0)


def worker_failed(message: str) -> None:
    """A tensor-parallel worker died: the command cannot go on. Called from rank 0's
    watchdog thread, so it ends the process itself, at once (the server's threads and a
    step waiting on the dead rank would otherwise keep it alive)."""
    print(f"falconet: error: {message}; stopping", file=sys.stderr, flush=True)
    os._exit(1)


def announce(llm) -> None:
    """One stderr line naming the loaded model's family and declared licence (models/card.py),
    written once the command has checked its flags against the model, so a user error
    stays one line."""
    print(f"falconet: {llm.path}: {llm.card.summary()}", file=sys.stderr, flush=True)


def progress_bar(desc: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """(progress(done, total), close()) drawing a tqdm byte bar on stderr, shown only once
    the work has taken a second."""
    from tqdm import tqdm

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, delay=1.0,
                       leave=False, file=sys.stderr)  # fmt: skip
        bar.update(done - bar.n)

    def close() -> None:
        if bar is not None:
            bar.close()

    return progress, close
