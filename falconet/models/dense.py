"""The dense reference path: a left-padded batch through the static KV cache, one
forward per chunk. No face runs it -- every face runs the engine -- it is the oracle the
tests compare the engine with, and the benchmarks' baseline.
"""

from __future__ import annotations

import torch

from falconet.nn.attention import prefill_chunk_size
from falconet.nn.cache import KVCache


def prefill(
    model,
    ids: torch.Tensor,
    valid: torch.Tensor,
    cache: KVCache,
    all_logits: bool = False,
    chunk: int | None = None,
) -> torch.Tensor:
    """Run the prompt through the model in chunks; returns fp32 logits of the last
    position (B, V), or of every position (B, T, V) with `all_logits`.

    Chunking bounds the attention mask (and activations) so memory grows linearly
    with the prompt, and gives exactly the unchunked result up to float rounding.
    """
    B, T = ids.shape
    chunk = chunk or prefill_chunk_size(model.config, B, cache.length + T)
    rope_len = cache.next_position + valid.long().sum(-1)  # every chunk rotates as one forward
    outs = []
    for start in range(0, T, chunk):
        stop = min(T, start + chunk)
        logits = model(ids[:, start:stop], cache, valid[:, start:stop], not all_logits, rope_len)
        outs.append(logits.float())
    return torch.cat(outs, dim=1) if all_logits else outs[-1][:, -1]


def decode_step(model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One new token per row (B,) -> next-token fp32 logits (B, V)."""
    return model(tokens[:, None], cache, last_only=True)[:, -1].float()


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        if p:
            ids[i, T - len(p) :] = torch.tensor(p, dtype=torch.long)
            valid[i, T - len(p) :] = True
    return ids, valid
