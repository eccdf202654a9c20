"""Perplexity of a text, computed the way llama.cpp's `perplexity` tool computes it.

llama.cpp (tools/perplexity/perplexity.cpp, function `perplexity`) is the reference
most published numbers for quantized models come from, so falconet follows it step by
step, and its numbers can be set side by side with llama.cpp's on the same text:

1. Tokenize the whole text once, with a BOS in front when the tokenizer adds one
   (Falcon's does not). An EOS is never appended (llama.cpp refuses such tokenizers).
2. Require at least 2 * ctx tokens, as llama.cpp does, and cut the first
   n_chunk = n_tokens // ctx * ctx tokens into n_chunk non-overlapping windows of ctx
   tokens; the tail shorter than a window is not used.
3. Run each window on its own, from position 0 with an empty cache. When the tokenizer
   adds a BOS, the window's first token is replaced by BOS (the text is not shifted).
4. Score only the second half of each window, so that every scored token has at least
   ctx/2 tokens of context: with first = ctx // 2, the logits at positions
   first .. ctx-2 predict the tokens at first+1 .. ctx-1. That is ctx - first - 1
   tokens per window (255 for ctx 512); the token at `first` itself is not scored.
5. NLL = logsumexp(logits) - logit[target], in fp32 from the model's logits, summed in
   float64. PPL = exp(mean NLL). After each window the running estimate exp(sum/count)
   is reported, as llama.cpp prints `[1]12.3456,[2]...`.
6. The "+/-" is llama.cpp's: ppl * sqrt((mean(NLL^2) - mean(NLL)^2) / (count - 1)), the
   standard error of the mean NLL carried through exp to first order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from falconet.errors import FalconetError
from falconet.tokenizer import Tokenizer

if TYPE_CHECKING:
    from falconet.llm import LLM

# The default window of llama.cpp's perplexity tool (its --ctx-size default).
DEFAULT_CTX = 512
# A window of 3 is the smallest that scores a token (first = 1 predicts position 2).
MIN_CTX = 3
# fp32 logits converted per slice of rows: bounds the extra memory to 64 MiB whatever
# the vocabulary (65024 tokens x 256 rows for Falcon-7B).
LOGSOFTMAX_ELEMENTS = 1 << 24


class PerplexityError(FalconetError):
    """A text or setting perplexity cannot be computed with (missing, too short, bad ctx)."""


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # exp(nll_mean)
    uncertainty: float  # llama.cpp's "+/-" (see the module docstring)
    nll_mean: float  # mean negative log-likelihood per scored token, in nats
    tokens_scored: int  # n_chunks * (ctx - ctx // 2 - 1)
    n_chunks: int
    ctx: int
    running_ppls: tuple[float, ...]  # the estimate after each window, llama.cpp's [i] list


def read_text(path: str | os.PathLike) -> str:
    """A text file as str: strict UTF-8, a leading byte order mark dropped.

    llama.cpp hands the raw bytes to its tokenizer; here a file that is not UTF-8 is an
    error rather than silently scored on replacement characters, which would not be the
    text the user meant.
    """
    p = Path(path)
    if not p.exists():
        raise PerplexityError(f"{p}: no such file")
    if not p.is_file():
        raise PerplexityError(f"{p}: not a file; give a UTF-8 text file")
    raw = p.read_bytes()
    if not raw:
        raise PerplexityError(f"{p}: the file is empty")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PerplexityError(
            f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8"
        ) from None


def chunk_bos(tokenizer: Tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one in front of a text (llama.cpp's add_bos)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    plain = tokenizer.encode("a", add_special_tokens=False)
    special = tokenizer.encode("a")
    return bos if special[:1] == [bos] and special[1 : 1 + len(plain)] == plain else None


def tokenize_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """The text's ids as llama.cpp tokenizes them: BOS first when the tokenizer adds one."""
    bos = chunk_bos(tokenizer)
    return ([bos] if bos is not None else []) + tokenizer.encode(text, add_special_tokens=False)


def check_window(ctx: int, batch: int, context: int | None = None) -> None:
    """Raise PerplexityError for a window or batch size that cannot work; `context` is
    the model's (max_position_embeddings), None to check before a model is loaded."""
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < MIN_CTX:
        raise PerplexityError(
            f"--ctx {ctx!r}: a window must be at least {MIN_CTX} tokens to score any "
            "(it scores its last ctx - ctx//2 - 1)"
        )
    if context is not None and ctx > context:
        raise PerplexityError(
            f"--ctx {ctx} is more than the model's {context}-token context "
            "(max_position_embeddings); use a smaller one"
        )
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise PerplexityError(f"--batch {batch!r}: give at least 1 window per forward pass")


def perplexity(
    llm: LLM,
    ids: list[int],
    ctx: int,
    batch: int = 1,
    progress: Callable[[int, int, float], None] | None = None,
    chunks: int | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of `ids` under `llm` (an LLM), as llama.cpp computes it.

    Windows of `ctx` tokens run `batch` at a time; only the second half of each is
    scored (see the module docstring for exactly which tokens, and why). `chunks` caps
    the number of windows (llama.cpp's --chunks; None = all). progress(i, n_chunks,
    running_ppl) is called after each window i = 1 .. n_chunks.
    """
    if chunks is not None and (
        isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1
    ):
        raise PerplexityError(f"chunks must be a positive number of windows, got {chunks!r}")
    config = llm.config
    check_window(ctx, batch, config.max_position_embeddings)
    if not isinstance(ids, (list, tuple)) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in ids
    ):
        raise PerplexityError("ids must be a list of int token ids")
    if len(ids) < 2 * ctx:
        raise PerplexityError(
            f"the text is {len(ids)} tokens; perplexity with a {ctx}-token window needs at "
            f"least {2 * ctx} (2 x ctx, as llama.cpp): give a longer text or a smaller --ctx"
        )
    n_chunks = len(ids) // ctx if chunks is None else min(chunks, len(ids) // ctx)
    tokens = torch.tensor(ids[: n_chunks * ctx], dtype=torch.long).view(n_chunks, ctx)
    if int(tokens.min()) < 0 or int(tokens.max()) >= config.vocab_size:
        raise PerplexityError(f"token ids must be in [0, {config.vocab_size})")
    bos = chunk_bos(llm.tokenizer)
    if bos is not None:
        tokens[:, 0] = bos  # llama.cpp overwrites, never shifts; position 0 is not scored

    first = ctx // 2
    nll_sum = nll2_sum = 0.0
    count = 0
    running: list[float] = []
    engine = llm.engine(ctx)
    for start in range(0, n_chunks, batch):
        x = tokens[start : start + batch]  # (B, ctx)
        logits = torch.stack(engine.score(x.tolist()))  # (B, ctx, V) fp32, through the engine
        with torch.inference_mode():
            # logits at first .. ctx-2 predict the tokens at first+1 .. ctx-1
            nll = token_nll(logits[:, first : ctx - 1], x[:, first + 1 :].to(logits.device))
        del logits
        for row in nll.cpu():
            nll_sum += float(row.sum())
            nll2_sum += float((row * row).sum())
            count += row.numel()
            running.append(math.exp(nll_sum / count))
            if progress is not None:
                progress(len(running), n_chunks, running[-1])

    nll_mean = nll_sum / count
    ppl = math.exp(nll_mean)
    variance = max(nll2_sum / count - nll_mean * nll_mean, 0.0)  # rounding can dip below 0
    return PerplexityResult(
        ppl=ppl,
        # one scored token (a tiny window, one chunk) has no spread to estimate
        uncertainty=ppl * math.sqrt(variance / (count - 1)) if count > 1 else math.nan,
        nll_mean=nll_mean,
        tokens_scored=count,
        n_chunks=n_chunks,
        ctx=ctx,
        running_ppls=tuple(running),
    )


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target]: logits (B, N, V), targets (B, N) -> float64 (B, N).

    Computed in fp32 a slice of rows at a time, so the fp32 copy stays small even when
    the model's logits are bf16 and the vocabulary is large."""
    B, N, V = logits.shape
    flat = logits.reshape(B * N, V)  # (B*N, V)
    target = targets.reshape(B * N, 1)
    out = torch.empty(B * N, dtype=torch.float64, device=logits.device)
    rows = max(1, LOGSOFTMAX_ELEMENTS // V)
    for i in range(0, B * N, rows):
        piece = flat[i : i + rows].float()  # (rows, V)
        picked = piece.gather(-1, target[i : i + rows])[:, 0]
        out[i : i + rows] = (torch.logsumexp(piece, dim=-1) - picked).double()
    return out.view(B, N)
