"""What every `falconet` command shares: the one-line error parser, the model and
sampling flags, and loading a model with a progress bar."""

from __future__ import annotations

import argparse
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
        "--model", "-m", default=None, help="HF Falcon folder (default: the embedded default model)"
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype. auto keeps the checkpoint's: for a bf16 (fp16) checkpoint "
                   "every linear layer rounds its inputs and outputs to bf16 (fp16), the rest "
                   "computes in fp32 on CPU and in bf16 (fp16) on GPU. float32 computes all in "
                   "fp32: the logits and logprobs transformers gives in fp32")  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--quant", default=None, metavar="TYPE",
                   help="quantize a HF checkpoint while loading: q8_0, q5_1, q5_0, q4_1 or q4_0")  # fmt: skip


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


def add_sampling_flags(p: argparse.ArgumentParser, max_tokens: int) -> None:
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


def sampling_params(args: argparse.Namespace):
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
        logprobs=getattr(args, "logprobs", None),  # only `generate` has the flag
    )


def load_model(args: argparse.Namespace):
    """The model the flags name, with the speculative-decoding flags applied where the
    command has them (a --draft model loads with the same dtype and device)."""
    import falconet

    draft_path = getattr(args, "draft", None)
    if draft_path is not None and not args.speculative:
        raise UsageError("--draft drafts for speculative decoding; drop --no-speculative")
    progress, close = progress_bar("loading")
    try:
        llm = falconet.load(
            args.model, dtype=args.dtype, device=args.device, progress=progress,
            quant=getattr(args, "quant", None),
        )  # fmt: skip
    finally:
        close()
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
