"""How a model splits over N tensor-parallel ranks (Megatron-LM's scheme), as data.

Notation: N ranks, r this rank, H query heads, K kv heads, D head dim, C hidden, F the
MLP's inner size, V vocabulary.

- column-parallel (output features split): the fused QKV / q,k,v projections by whole
  heads (rank r: query heads [r H/N, (r+1) H/N) and the kv heads they read), the MLP's
  up-projections (F/N rows each). No communication: each rank's heads and MLP slice are
  complete on their own.
- row-parallel (input features split): the attention output and the MLP's down
  projection take this rank's heads / F slice and give a partial sum of the whole
  output; one all-reduce per projection adds the ranks' partial sums, then the bias once.
- K kv heads split K/N per rank; a multi-query model's single kv head is kept whole on
  every rank (Falcon-7B: 1 K and 1 V head, 2 D values per token, cheaper than splitting).
- vocabulary-parallel: embeddings and LM head hold ceil(V/N) rows each; a lookup takes
  rows from their owner (all-reduce of one non-zero term, exact), the head's logit
  slices are gathered into a whole row for sampling.
- norms and the row-parallel biases: whole on every rank.
- Falcon-Mamba (Mamba-1), as vLLM splits it: the E inner channels E/N per rank. in_proj
  gives u and z (two halves, each split), the conv filters, dt_proj, A_log and D follow
  the channels; x_proj (E -> dt, B, C) and out_proj are row-parallel, so every rank has
  the whole dt, B and C, and each rank's conv and SSM state hold its channels only.
- Falcon-H1: its attention and MLP as Llama's; its Mamba-2 by heads: z, x and dt (and
  the conv's x channels, A_log, D, dt_bias, the gated norm's weight) split with the
  heads; B and C split with the groups where the ranks divide them, else (one group)
  every rank computes them whole, and the gated norm, whose group then spans the ranks,
  sums its squares over them (its `reduce_squares`, set at load). out_proj is row-parallel.

`SHARDS` maps the HF tensor names of each registered architecture to their kind; a rank
reads only the slice its kind gives (`tensor_slices`), straight from the checkpoint.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from falconet.errors import FalconetError
from falconet.models.registry import ModelConfig, for_config
from falconet.quant import get_format
from falconet.weights.gguf import K_MIXES


class TensorParallelError(FalconetError):
    """A model or setting tensor parallelism cannot run, or a rank that failed."""


# kinds of tensor (how rank r of N holds it)
OUT = "out"  # output features (rows) split N ways: column-parallel
IN = "in"  # input features (columns) split N ways: row-parallel
KV = "kv"  # kv-head rows: split, or whole when there is a single kv head
QKV = "qkv"  # Falcon's fused QKV: this rank's query heads and kv heads
HALVES = "halves"  # two stacked halves (Mamba's u and z), each split N ways
MAMBA2_IN = "mamba2_in"  # Mamba-2's in_proj rows: z, x, B, C, dt
MAMBA2_CONV = "mamba2_conv"  # Mamba-2's conv channels: x, B, C
VOCAB = "vocab"  # vocabulary rows, ceil(V/N) per rank
# anything not listed: whole on every rank

# a Llama-style attention's projections (Falcon3, Falcon-H1)
LLAMA_ATTENTION = {
    "*.self_attn.q_proj.*": OUT,
    "*.self_attn.k_proj.*": KV,
    "*.self_attn.v_proj.*": KV,
    "*.self_attn.o_proj.weight": IN,
}


def swiglu(mlp: str) -> dict[str, str]:
    """A SwiGLU MLP's projections under module name `mlp`."""
    return {f"*.{mlp}.gate_proj.*": OUT, f"*.{mlp}.up_proj.*": OUT, f"*.{mlp}.down_proj.weight": IN}


SHARDS: dict[str, dict[str, str]] = {
    "falcon": {
        "transformer.word_embeddings.weight": VOCAB,
        "lm_head.weight": VOCAB,
        "*.self_attention.query_key_value.*": QKV,
        "*.self_attention.dense.weight": IN,
        "*.mlp.dense_h_to_4h.*": OUT,
        "*.mlp.dense_4h_to_h.weight": IN,
    },
    "llama": {
        "model.embed_tokens.weight": VOCAB,
        "lm_head.weight": VOCAB,
        **LLAMA_ATTENTION,
        **swiglu("mlp"),
    },
    "falcon_mamba": {
        "backbone.embeddings.weight": VOCAB,
        "lm_head.weight": VOCAB,
        "*.mixer.in_proj.*": HALVES,
        "*.mixer.conv1d.*": OUT,
        "*.mixer.dt_proj.*": OUT,
        "*.mixer.A_log": OUT,
        "*.mixer.D": OUT,
        "*.mixer.x_proj.weight": IN,
        "*.mixer.out_proj.weight": IN,
    },
    "falcon_h1": {
        "model.embed_tokens.weight": VOCAB,
        "lm_head.weight": VOCAB,
        **LLAMA_ATTENTION,
        **swiglu("feed_forward"),
        "*.mamba.in_proj.*": MAMBA2_IN,
        "*.mamba.conv1d.*": MAMBA2_CONV,
        "*.mamba.dt_bias": OUT,
        "*.mamba.A_log": OUT,
        "*.mamba.D": OUT,
        "*.mamba.norm.weight": OUT,
        "*.mamba.out_proj.weight": IN,
    },
}

# modules whose output is a partial sum over ranks (all-reduced, then the bias added)
ROW_PARALLEL: dict[str, tuple[str, ...]] = {
    "falcon": ("*.self_attention.dense", "*.mlp.dense_4h_to_h"),
    "llama": ("*.self_attn.o_proj", "*.mlp.down_proj"),
    "falcon_mamba": ("*.mixer.x_proj", "*.mixer.out_proj"),
    "falcon_h1": ("*.self_attn.o_proj", "*.feed_forward.down_proj", "*.mamba.out_proj"),
}


def kind_of(arch: str, name: str) -> str | None:
    """The shard kind of HF tensor `name`, None when every rank holds it whole."""
    return next((k for p, k in SHARDS[arch].items() if fnmatchcase(name, p)), None)


def is_row_parallel(arch: str, module: str) -> bool:
    return any(fnmatchcase(module, p) for p in ROW_PARALLEL[arch])


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_tensor_parallel(config: ModelConfig, world: int, quant: str | None = None) -> None:
    """Raise TensorParallelError when `config` cannot be split over `world` ranks; called
    before any worker starts."""
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise TensorParallelError(f"--tp must be a positive integer, got {world!r}")
    arch = for_config(config).name
    if arch not in SHARDS:
        raise TensorParallelError(
            f"tensor parallelism covers Falcon, Llama-style (Falcon3), Falcon-Mamba and "
            f"Falcon-H1 models; "
            f"a {config.variant} model ({arch}) runs with --tp 1"
        )
    if getattr(config, "bitnet", None) is not None:
        raise TensorParallelError("ternary (BitNet) checkpoints run with --tp 1 for now")
    if quant in K_MIXES:  # per-tensor types: each row-parallel matrix by its own blocks
        _check_mix(config, world, quant)
        quant = None
    if arch == "falcon_mamba":
        _check_split({"the inner size (d_inner)": config.intermediate_size}, world, quant)
        return
    if arch == "falcon_h1":
        G = config.mamba_n_groups
        if G % world and G != 1:
            raise TensorParallelError(
                f"--tp {world}: mamba_n_groups {G} is not divisible by {world} (and not 1, "
                "which every rank would compute whole); use a size that divides it"
            )
        _check_split({"mamba_n_heads": config.mamba_n_heads}, world, None)
        _check_blocks({"Mamba out_proj": config.mamba_d_ssm}, world, quant)
    H, K, F = config.num_attention_heads, config.kv_heads, config.ffn_size
    for what, n in (("num_attention_heads", H), ("kv heads", K), ("the MLP size", F)):
        if what == "kv heads" and n == 1:
            continue  # multi-query: the one kv head is kept whole on every rank
        if n % world:
            sizes = [d for d in divisors(H) if K % d == 0 or K == 1]
            raise TensorParallelError(
                f"--tp {world}: {what} {n} is not divisible by {world}; use a tensor-parallel "
                f"size that divides the heads and kv heads ({', '.join(map(str, sizes))})"
            )
    _check_blocks({"attention output": H * config.head_dim, "MLP down projection": F}, world, quant)


def _check_mix(config: ModelConfig, world: int, mix: str) -> None:
    from falconet.models.checkpoint import expected_tensors, load_mix_plan

    shapes = expected_tensors(config)
    blocks = {
        name: (shapes[name], qtype, get_format(qtype).block_size)
        for name, qtype in load_mix_plan(mix, config).items()
        if qtype
    }
    check_file_blocks(for_config(config).name, blocks, world)


def _check_split(sizes: dict[str, int], world: int, quant: str | None) -> None:
    """Each size divides by `world`, and its per-rank part into whole `quant` blocks
    (the row-parallel projections' inputs)."""
    for what, n in sizes.items():
        if n % world:
            sizes_ok = [d for d in divisors(n) if d > 1]
            raise TensorParallelError(
                f"--tp {world}: {what} {n} is not divisible by {world}; use a tensor-parallel "
                f"size that divides it ({', '.join(map(str, sizes_ok))})"
            )
    _check_blocks(sizes, world, quant)


def _check_blocks(inner: dict[str, int], world: int, quant: str | None) -> None:
    if quant is None:
        return
    block = get_format(quant).block_size
    for what, n in inner.items():
        if (n // world) % block:
            raise TensorParallelError(
                f"--tp {world} with {quant}: the {what}'s {n // world} input features per "
                f"rank are not a whole number of {block}-value blocks; use a smaller --tp"
            )


def check_file_blocks(
    arch: str, tensors: dict[str, tuple[tuple[int, ...], str, int]], world: int
) -> None:
    """A GGUF file's row-parallel matrices split by whole blocks of their own type:
    tensors maps HF name -> (shape, type name, block size)."""
    for name, (shape, kind, block) in tensors.items():
        if kind_of(arch, name) == IN and (shape[1] // world) % block:
            raise TensorParallelError(
                f"--tp {world}: {name} ({kind}) has {shape[1]} input features, "
                f"{shape[1] // world} per rank: not a whole number of its {block}-value "
                "blocks; use a smaller --tp"
            )


class ShardConfig:
    """The config one rank's modules are built from: its share of the heads and of the
    MLP, everything else the model's own config (read through). The KV cache a rank
    keeps follows it too: K/N kv heads (the whole one for multi-query). Its heads are
    [first_head, first_head + H/N) of the model's total_heads (ALiBi's slopes follow)."""

    def __init__(self, full: ModelConfig, world: int, rank: int = 0) -> None:
        self.full = full
        self.world = world
        arch = for_config(full).name
        if arch == "falcon_mamba":  # no heads: E/N inner channels
            self.intermediate_size = full.intermediate_size // world
            return
        if arch == "falcon_h1":  # Mamba-2 heads (and groups, where they divide)
            self.mamba_d_ssm = full.mamba_d_ssm // world
            self.mamba_n_heads = full.mamba_n_heads // world
            G = full.mamba_n_groups
            self.mamba_n_groups = G // world if G % world == 0 else G
            self.conv_dim = self.mamba_d_ssm + 2 * self.mamba_n_groups * full.mamba_d_state
            self.in_proj_size = self.mamba_d_ssm + self.conv_dim + self.mamba_n_heads
        self.num_attention_heads = full.num_attention_heads // world
        self.total_heads = full.num_attention_heads
        self.first_head = rank * self.num_attention_heads
        self.kv_heads = 1 if full.kv_heads == 1 else full.kv_heads // world
        self.num_key_value_heads = self.kv_heads  # the Llama name
        self.head_dim = full.head_dim
        self.ffn_size = full.ffn_size // world
        self.intermediate_size = self.ffn_size  # the Llama name

    @property
    def qkv_size(self) -> int:
        return (self.num_attention_heads + 2 * self.kv_heads) * self.head_dim

    def __getattr__(self, name: str) -> Any:  # only for what is not set above
        method = inspect.getattr_static(type(self.full), name, None)
        if inspect.isfunction(method):  # the config's methods read the shard's sizes
            return method.__get__(self)  # (ssm_state_shapes: the rank's channels)
        return getattr(self.full, name)  # static and class methods, fields, properties

    def __repr__(self) -> str:
        return f"ShardConfig({self.world} ranks of {self.full!r})"


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `world`."""

    rank: int
    world: int

    def split(self, n: int) -> slice:
        """This rank's part of n items split evenly."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def vocab(self, vocab_size: int) -> slice:
        """This rank's vocabulary rows: ceil(V/N) each, the last rank maybe fewer."""
        per = -(-vocab_size // self.world)
        return slice(min(vocab_size, self.rank * per), min(vocab_size, (self.rank + 1) * per))


def tensor_slices(
    arch: str,
    name: str,
    shape: tuple[int, ...],
    *,
    config: ModelConfig,
    shard: Shard,
    grouped_qkv: bool = True,
) -> list[tuple[slice, ...]]:
    """The index tuples of HF tensor `name` (HF shape `shape`) that `shard` holds, to be
    concatenated along dim 0 in this order. [(slice(None),)] is the whole tensor.
    grouped_qkv: Falcon's fused QKV rows are HF's kv-head groups; False reads falconet's
    own [all Q | all K | all V] rows (a GGUF file's attn_qkv), already the shard's order
    once each part is sliced."""
    kind = kind_of(arch, name)
    whole = slice(None)
    if kind is None or shard.world == 1:
        return [(whole,)]
    if kind == OUT:
        return [(shard.split(shape[0]),)]
    if kind == IN:
        return [(whole, shard.split(shape[1]))]
    if kind == VOCAB:
        return [(shard.vocab(shape[0]),)]
    if kind == KV:
        return [(whole,)] if config.kv_heads == 1 else [(shard.split(shape[0]),)]
    if kind == HALVES:
        half = shape[0] // 2
        mine = shard.split(half)
        return [(mine,), (slice(half + mine.start, half + mine.stop),)]
    if kind in (MAMBA2_IN, MAMBA2_CONV):
        E, G, N = config.mamba_d_ssm, config.mamba_n_groups, config.mamba_d_state
        parts = [E, E, G * N, G * N, config.mamba_n_heads]  # z, x, B, C, dt
        split = [True, True, G % shard.world == 0, G % shard.world == 0, True]
        if kind == MAMBA2_CONV:  # x, B, C
            parts, split = parts[1:4], split[1:4]
        out, at = [], 0
        for n, by_rank in zip(parts, split, strict=True):
            mine = shard.split(n) if by_rank else slice(0, n)
            out.append((slice(at + mine.start, at + mine.stop),))
            at += n
        return out
    # QKV: the HF rows are K groups of (H/K query heads, 1 key head, 1 value head)
    # (regroup_qkv in models/falcon.py), so a rank's kv heads and the query heads that read
    # them are one contiguous run of groups; with one kv head, the query rows are split
    # and the key and value rows kept whole.
    H, K, D = config.num_attention_heads, config.kv_heads, config.head_dim
    if K == 1:
        q = shard.split(H * D)
        return [(q,), (slice(H * D, (H + 2) * D),)]
    if grouped_qkv:
        return [(shard.split(shape[0]),)]
    kv = shard.split(K * D)
    return [
        (shard.split(H * D),),
        (slice(H * D + kv.start, H * D + kv.stop),),
        (slice((H + K) * D + kv.start, (H + K) * D + kv.stop),),
    ]
