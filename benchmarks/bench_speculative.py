"""Decode speed with speculative decoding on vs off, on a RAG-answer load.

Each prompt holds --passages passages of text (paragraphs of --text, by default this
repository's README and docs) and a question about one of them, and asks for a
--max-tokens answer (greedy, ignore_eos) -- the load prompt lookup is for: an answer
that quotes its passages. Every request runs through the public API, `LLM.stream`, once
with speculation on (prompt lookup, or --draft MODEL) and once off, the two alternating
pair by pair (on first in even pairs, off first in odd ones) on one loaded model (the
two LLM objects share its weights). Decode tok/s is (tokens - 1) / (last piece - first
piece); each pair gives a ratio on / off, and the table shows the medians, with the
share of drafted tokens the model accepted. The texts on and off must be identical
(asserted): speculation never changes a greedy answer.

A model with random weights never copies its prompt, so drafts are rejected and the
ratio measures only what speculation costs; measure with a trained model.

    python benchmarks/bench_speculative.py --model PATH [--draft SMALLER_MODEL]
    python benchmarks/bench_speculative.py --smoke    # the embedded tiny model, a quick check
    python benchmarks/bench_speculative.py --model falconet/models/falconet-tiny \
        --text tests/data/rag_corpus/*.txt --lines 2     # verses it was trained on: it copies
    python benchmarks/bench_speculative.py --model falconet-tiny-instruct \
        --chats data/sft/heldout.jsonl   # `rag ask`'s own prompts; answers end at eos

With --chats the prompts are the user turns of a chat JSONL (scripts/make_rag_sft.py's
heldout.jsonl holds the prompts `falconet rag ask` sends), rendered with the model's chat
template, and each answer runs to its end (eos, or --max-tokens): decode tok/s counts
the answer's tokens.

Not used by the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import falconet
from falconet.llm import LLM

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = [REPO / "README.md", REPO / "docs" / "design.md"]


def paragraphs(paths: list[Path], min_chars: int = 200, lines: int = 0) -> list[str]:
    """The texts' paragraphs (blocks between blank lines), or with `lines` > 0 runs of that
    many non-empty lines (for one-verse-per-line texts such as tests/data/rag_corpus)."""
    out = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        if lines > 0:
            rows = [r for r in text.splitlines() if r.strip()]
            runs = (" ".join(rows[i : i + lines]) for i in range(0, len(rows), lines))
            out += [r for r in runs if len(r) >= min_chars]
            continue
        for block in text.split("\n\n"):
            block = " ".join(block.split())
            if len(block) >= min_chars and not block.startswith(("```", "|")):
                out.append(block)
    if not out:
        sys.exit(f"no paragraphs of {min_chars}+ characters in {', '.join(map(str, paths))}")
    return out


def rag_prompts(
    llm: LLM, paras: list[str], n: int, passages: int, budget: int, seed: int
) -> list[str]:
    """n prompts of `passages` paragraphs and a question on one of them, each cut to
    `budget` tokens of passages (the context must hold the answer too)."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n):
        picked = [paras[int(i)] for i in torch.randperm(len(paras), generator=g)[:passages]]
        target = picked[int(torch.randint(0, len(picked), (1,), generator=g))]
        context = ""
        for i, p in enumerate(picked):
            block = f"[{i + 1}] {p}\n\n"
            if len(llm.tokenizer.encode(context + block)) > budget:
                break
            context += block
        opening = " ".join(target.split()[:6])
        prompts.append(
            f"Passages:\n\n{context}Question: what does the passage that begins "
            f'"{opening}" say? Answer by quoting it.\nAnswer: {opening}'
        )
    return prompts


def chat_prompts(llm: LLM, path: Path, n: int) -> list[list[int]]:
    """The first n user turns of a chat JSONL, each rendered alone as a prompt."""
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines()[:n]:
        user = [m for m in json.loads(line)["messages"] if m["role"] == "user"][:1]
        prompts.append(llm.chat_prompt(user))
    return prompts


def timed_stream(
    llm: LLM, prompt: str | list[int], max_tokens: int, to_end: bool = False
) -> tuple[float, str]:
    """(decode tok/s, text) of one greedy answer read through LLM.stream: max_tokens of
    them, or with `to_end` up to eos (the tokens counted by encoding the text)."""
    first = None
    text = ""
    for piece in llm.stream(prompt, max_tokens=max_tokens, ignore_eos=not to_end):
        first = time.perf_counter() if first is None else first
        text += piece
    end = time.perf_counter()
    n = len(llm.tokenizer.encode(text, add_special_tokens=False)) if to_end else max_tokens
    if first is None or end <= first or n < 2:
        return float("nan"), text
    return (n - 1) / (end - first), text


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="model folder or .gguf (falconet.load)")
    ap.add_argument(
        "--draft", default=None, help="draft with this smaller model, not prompt lookup"
    )
    ap.add_argument("--quant", default=None, help="quantize a HF folder while loading")
    ap.add_argument("--text", type=Path, nargs="+", action="extend", default=None,
                    help="text files the passages come from (repeatable; default README + docs)")  # fmt: skip
    ap.add_argument("--chats", type=Path, default=None,
                    help="prompts: the user turns of this chat JSONL (see above)")  # fmt: skip
    ap.add_argument("--lines", type=int, default=0,
                    help="passages of this many lines of --text instead of its paragraphs")  # fmt: skip
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--passages", type=int, default=4, help="passages per prompt")
    ap.add_argument("--pairs", type=int, default=5, help="on/off pairs per prompt")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--draft-tokens", type=int, default=8, help="tokens drafted per step, at most")
    ap.add_argument("--smoke", action="store_true",
                    help="the embedded tiny model, 2 prompts, 1 pair, 32-token answers")  # fmt: skip
    args = ap.parse_args()
    if args.smoke:
        args.prompts, args.pairs, args.max_tokens = 2, 1, 32
    elif args.model is None:
        ap.error("--model is needed (or --smoke)")
    on = falconet.load(args.model, quant=args.quant)
    draft = falconet.load(args.draft) if args.draft else None
    on.set_speculative(True, draft, args.draft_tokens)
    off = LLM(on.model, on.tokenizer, on.path, on.card)  # the same weights
    off.set_speculative(False)
    context = on.config.max_position_embeddings
    budget = min(2048, context - args.max_tokens - 64)
    if budget < 64:
        sys.exit(f"the model's context ({context} tokens) has no room for passages")
    to_end = args.chats is not None
    if to_end:
        prompts = chat_prompts(on, args.chats, args.prompts)
    else:
        prompts = rag_prompts(on, paragraphs(args.text or DEFAULT_TEXT, lines=args.lines),
                              args.prompts, args.passages, budget, seed=0)  # fmt: skip
    timed_stream(on, prompts[0], 4)  # warm-up: engines built, kernels loaded
    timed_stream(off, prompts[0], 4)
    rows = []
    for i, prompt in enumerate(prompts):
        speeds: dict[str, list[float]] = {"on": [], "off": []}
        before = on.engine().stats()
        for pair in range(args.pairs):
            order = [("on", on), ("off", off)] if pair % 2 == 0 else [("off", off), ("on", on)]
            texts = {}
            for name, llm in order:
                tps, texts[name] = timed_stream(llm, prompt, args.max_tokens, to_end)
                speeds[name].append(tps)
            if texts["on"] != texts["off"]:
                raise SystemExit(f"prompt {i}: speculation changed the greedy answer")
        after = on.engine().stats()
        drafted = after.draft_tokens - before.draft_tokens
        accepted = after.accepted_draft_tokens - before.accepted_draft_tokens
        ratios = [a / b for a, b in zip(speeds["on"], speeds["off"], strict=True)]
        n = len(prompt) if to_end else len(on.tokenizer.encode(prompt))
        rows.append((i, n, statistics.median(speeds["off"]),
                     statistics.median(speeds["on"]), statistics.median(ratios),
                     accepted / drafted if drafted else 0.0))  # fmt: skip
    mode = f"draft model {args.draft}" if args.draft else "prompt lookup"
    print(f"model {on.path} ({on.card.summary()}); speculative: {mode}, up to "
          f"{args.draft_tokens} drafts; greedy answers of "
          f"{'up to ' if to_end else ''}{args.max_tokens} tokens; "
          f"{args.pairs} alternating pairs per prompt; torch threads {torch.get_num_threads()}\n")  # fmt: skip
    print("| prompt | prompt tokens | decode tok/s off | decode tok/s on | on/off (median of pairs) | drafts accepted |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    for i, n, off_tps, on_tps, ratio, acc in rows:
        print(f"| {i} | {n} | {off_tps:.1f} | {on_tps:.1f} | {ratio:.2f}x | {acc:.0%} |")
    print(f"\nmedian on/off over prompts: {statistics.median(r[4] for r in rows):.2f}x; "
          "answers identical on/off: True")  # fmt: skip


if __name__ == "__main__":
    main()
