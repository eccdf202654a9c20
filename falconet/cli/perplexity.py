"""`falconet perplexity`: perplexity of a text file, as llama.cpp computes it."""

from __future__ import annotations

import argparse

from falconet.cli.common import Out, add_model_flags, load_model
from falconet.errors import FalconetError


def add_parsers(sub) -> None:
    ppl = sub.add_parser("perplexity", help="perplexity of a text file, as llama.cpp computes it")
    ppl.add_argument("textfile", help="UTF-8 text file (at least 2 x --ctx tokens)")
    add_model_flags(ppl)
    ppl.add_argument("--ctx", type=int, default=None,
                     help="window in tokens; the second half of each is scored (default: min(512, model context))")  # fmt: skip
    ppl.add_argument("--batch", type=int, default=1, help="windows per forward pass")
    ppl.add_argument("--chunks", type=int, default=None,
                     help="score only the first N windows (llama.cpp's --chunks; default all)")  # fmt: skip


def cmd_perplexity(args: argparse.Namespace, out: Out) -> int:
    from falconet.perplexity import DEFAULT_CTX, check_window, perplexity, read_text, tokenize_text

    check_window(DEFAULT_CTX if args.ctx is None else args.ctx, args.batch)  # before the load
    if args.chunks is not None and args.chunks < 1:
        raise FalconetError(f"--chunks must be at least 1, got {args.chunks}")
    text = read_text(args.textfile)
    llm = load_model(args)
    ctx = min(DEFAULT_CTX, llm.config.max_position_embeddings) if args.ctx is None else args.ctx
    ids = tokenize_text(llm.tokenizer, text)
    r = perplexity(llm, ids, ctx, args.batch, lambda i, n, ppl: out(f"[{i}]{ppl:.4f},"),
                   chunks=args.chunks)  # fmt: skip
    out(f"\nFinal estimate: PPL = {r.ppl:.4f} +/- {r.uncertainty:.5f}\n")
    out(f"tokens scored: {r.tokens_scored} of {len(ids)} (the last {ctx - ctx // 2 - 1} "
        f"of each of {r.n_chunks} windows of {ctx})\n")  # fmt: skip
    return 0
