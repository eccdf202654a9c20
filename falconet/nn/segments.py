"""Sequences side by side in one call: the per-segment loop of the recurrent mixers.

A recurrent mixer (Mamba-1, Mamba-2) carries state along a sequence, so its conv and
scan run per sequence, while its projections run on every row at once. The engine packs
several sequences into one row (1, N); a dense batch (B, T) is one segment over all T.
A segment is (rows, conv state, SSM state) of one layer: the slice of the call's tokens
that belong to one sequence and that sequence's state views, advanced in place (None for
a stateless forward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SegmentState = tuple[slice, torch.Tensor | None, torch.Tensor | None]


def per_segment(
    states: list[SegmentState],
    fn: Callable[[slice, torch.Tensor | None, torch.Tensor | None], torch.Tensor],
) -> torch.Tensor:
    """fn(rows, conv, ssm) -> (B, rows, ...) for each segment, joined along the tokens."""
    outs = [fn(rows, conv, ssm) for rows, conv, ssm in states]
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
