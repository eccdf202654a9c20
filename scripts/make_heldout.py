"""Write tests/data/heldout.txt: KJV text the default model (falconet-tiny) never trained on.

scripts/train_default_model.sh trained falconet-tiny on data/kjv with --block-size 256
--val-fraction 0.05: the corpus is read in sorted file order, tokenized with the model's
tokenizer (each book followed by <|endoftext|>), cut into 256-token blocks, and every
k-th block (np.linspace over the blocks) is held out (falconet/train/data.py). This
script rebuilds exactly that split with the same functions and the shipped tokenizer,
prints the shipped model's loss on the held-out blocks (to compare with the README's
held-out loss, which proves the split is the same), and writes excerpts of evenly spread
held-out blocks that hold no <|endoftext|>:

- of block b (257 tokens, the last shared with the next, training, block) only the
  tokens b[1:256] are used: b[0] was also the last target of the previous training block;
- the decoded text is cut to whole lines (after its first newline, up to and with its
  last), so no excerpt starts or ends mid-word or mid-UTF-8-character;
- excerpts are joined in corpus order.

Usage: .venv/bin/python scripts/make_heldout.py [--corpus data/kjv] [--blocks 12]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

import falconet
from falconet.train.data import pack_blocks, read_corpus, tokenize_corpus

ROOT = Path(__file__).resolve().parent.parent
BLOCK_SIZE = 256  # --block-size of scripts/train_default_model.sh
VAL_FRACTION = 0.05  # --val-fraction of scripts/train_default_model.sh


def heldout_loss(llm, val: np.ndarray) -> float:
    """Mean next-token loss over the held-out blocks, as the trainer's evaluate()."""
    total, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(val), 16):
            x = torch.as_tensor(val[i : i + 16], dtype=torch.long)  # (B, block_size + 1)
            logits = llm.model(x[:, :-1]).float()  # (B, block_size, V)
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"
            ).item()
            n += x[:, 1:].numel()
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(ROOT / "data" / "kjv"))
    ap.add_argument("--blocks", type=int, default=12, help="held-out blocks to excerpt")
    ap.add_argument("--out", default=str(ROOT / "tests" / "data" / "heldout.txt"))
    args = ap.parse_args()

    llm = falconet.load()  # the shipped falconet-tiny, and its tokenizer
    tok = llm.tokenizer
    tokens = tokenize_corpus(read_corpus([Path(args.corpus)]).documents, tok)
    blocks = pack_blocks(tokens, BLOCK_SIZE, VAL_FRACTION)
    loss = heldout_loss(llm, blocks.val)
    print(
        f"{len(tokens)} tokens, {len(blocks.train)} training + {len(blocks.val)} held-out "
        f"blocks; held-out loss of the shipped model {loss:.4f} (perplexity {math.exp(loss):.2f})"
    )

    clean = [b for b in blocks.val if tok.eos_token_id not in b]
    picks = np.linspace(0, len(clean) - 1, args.blocks).round().astype(int)
    excerpts = []
    for i in picks:
        text = tok.decode(clean[i][1:BLOCK_SIZE].tolist())
        excerpts.append(text[text.index("\n") + 1 : text.rindex("\n") + 1])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(excerpts), encoding="utf-8")
    print(f"wrote {out}: {len(excerpts)} excerpts, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
