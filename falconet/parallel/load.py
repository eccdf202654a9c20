"""One rank's shard of a model, read straight from a Hugging Face checkpoint or a GGUF file.

The model is built on the meta device from the rank's `ShardConfig` (its share of the
heads and of the MLP), so its projections already have the shard's shapes. Each tensor
is then read as the slices plan.py gives it -- safetensors' `get_slice`, copied out of a
mapping opened for that tensor alone and released right after, so a rank never holds
more than its shard plus one tensor -- transformed (Falcon's QKV
regrouped over this rank's heads), quantized if asked (a shard's rows are whole blocks:
plan.check_tensor_parallel makes sure of it), and installed. A GGUF file's tensors are
sliced the same way from its memory map: quantized matrices by whole rows of blocks
(column-parallel) or by whole blocks of every row (row-parallel; plan.check_file_blocks),
so a rank's blocks are the file's own bytes, never requantized. Last, the modules that
talk to the other ranks are wrapped around the loaded ones (layers.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from falconet.errors import CheckpointError
from falconet.models.base import CausalLM
from falconet.models.checkpoint import load_mix_plan, read_config, read_gguf, row_order
from falconet.models.registry import ModelConfig, for_config
from falconet.parallel.layers import GatheredHead, RowParallel, VocabParallelEmbedding, summed
from falconet.parallel.plan import (
    QKV,
    VOCAB,
    Shard,
    ShardConfig,
    TensorParallelError,
    check_file_blocks,
    check_tensor_parallel,
    is_row_parallel,
    kind_of,
)
from falconet.parallel.plan import tensor_slices as slices_of
from falconet.parallel.shm import SharedMemoryGroup
from falconet.quant import QuantError, get_format
from falconet.quant.linear import QuantTensor, install, release_pages
from falconet.quant.plan import tensor_qtype
from falconet.weights.gguf import (
    K_MIXES,
    block_size,
    file_shape,
    is_gguf,
    kept_as_blocks,
    stored_dtype,
    tensor_value,
)
from falconet.weights.hf import IGNORED_SUFFIXES, weight_files


def source_config(source: Path) -> ModelConfig:
    """The model config of a Hugging Face folder or a GGUF file."""
    return read_gguf(source).config if is_gguf(source) else read_config(source)


def check_source(source: Path, config: ModelConfig, world: int, quant: str | None) -> None:
    """TensorParallelError when `source` cannot be split over `world` ranks (called before
    any worker starts): the model's head and MLP counts, and a GGUF file's row-parallel
    matrices, which must split by whole blocks of their own types."""
    check_tensor_parallel(config, world, quant)
    if not is_gguf(source):
        return
    if quant is not None:
        raise TensorParallelError(f"{source}: a GGUF file keeps its own types; drop --quant")
    arch = for_config(config).name
    if arch not in ("falcon", "llama"):  # their tensors convert from the file's forms
        raise TensorParallelError(
            f"{source}: tensor parallelism reads {arch} models from Hugging Face folders; "
            "run this GGUF file with --tp 1"
        )
    blocks = {
        name: (file_shape(t), t.tensor_type.name, block_size(t))
        for name, t in read_gguf(source).tensors.items()
    }
    check_file_blocks(arch, blocks, world)


def load_shard(
    source: Path,
    config: ModelConfig,
    shard: Shard,
    dtype: torch.dtype,
    compute_dtype: torch.dtype,
    quant: str | None = None,
    progress: Callable[[int], None] | None = None,
    shm: SharedMemoryGroup | None = None,
) -> CausalLM:
    """Rank `shard.rank`'s model, its collectives in place (needs the process group, and
    meets the other ranks in `shm` where given); `source` is a Hugging Face folder or a
    GGUF file."""
    arch = for_config(config)
    local_config = ShardConfig(config, shard.world, shard.rank)
    model = arch.shapes(local_config, dtype, compute_dtype)
    layout = arch.layout(config)  # the checkpoint's (whole) tensors
    gguf = is_gguf(source)
    # a GGUF file's rows are falconet's own (the converter regrouped Falcon's QKV)
    transforms = {} if gguf else arch.model.checkpoint_layout(local_config).transforms
    params = dict(model.named_parameters(remove_duplicate=False))
    mix = load_mix_plan(quant, config) if quant in K_MIXES else None
    found: set[str] = set()
    for path, name, read in _gguf_tensors(source, config) if gguf else _tensors(source):
        if name.endswith(IGNORED_SUFFIXES) or name in layout.skipped:
            continue
        if name not in layout.shapes:
            raise CheckpointError(
                f"{path}: unexpected tensor {name}; the checkpoint does not match config.json "
                f"({layout.description})"
            )
        slices = partial(
            slices_of, arch.name, name, config=config, shard=shard, grouped_qkv=not gguf
        )
        t = read(layout.shapes[name], slices)
        if name in transforms and kind_of(arch.name, name) == QKV:
            t = transforms[name](t)
        target = params[name]
        if kind_of(arch.name, name) != VOCAB and tuple(t.shape) != tuple(target.shape):
            raise CheckpointError(  # a slicing bug, not the user's: say what was expected
                f"{path}: tensor {name}: rank {shard.rank}'s slice is {tuple(t.shape)}, "
                f"the shard expects {tuple(target.shape)}"
            )
        if isinstance(t, QuantTensor) or quant is None:
            qtype = None
        elif mix is not None:  # a K-quant mix: each tensor's type as the one-process plan's
            qtype = mix.get(name)
        else:
            qtype = name not in layout.keep_float and tensor_qtype(
                tuple(t.shape), quant, name in layout.heads
            )
        if isinstance(t, QuantTensor):
            install(model, name, t)
        elif qtype:
            install(model, name, QuantTensor.quantize(t, qtype, name=f"{path.name}: {name}"))
        else:
            install(model, name, t.to(target.dtype) if target.is_floating_point() else t)
        found.add(name)
        if progress is not None:
            progress(t.data.numel() if isinstance(t, QuantTensor) else t.numel() * t.element_size())
        del t
    missing = [n for n in layout.shapes if n not in found]
    if missing:
        raise CheckpointError(
            f"{source}: the checkpoint has no tensor {missing[0]}"
            + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "")
            + f"; is this a complete {layout.name} checkpoint?"
        )
    model.tie_weights()
    _join_ranks(model, config, shard, shm)
    return model


def _check_shape(path: Path, name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if got != tuple(want):
        raise CheckpointError(
            f"{path}: tensor {name} has shape {tuple(got)}, expected {want} from config.json"
        )


def _tensors(folder: Path):
    """(file, HF name, read(expected shape, slices) -> this rank's slice) per tensor;
    slices(shape) gives the index tuples to read (plan.tensor_slices)."""
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            yield from _safetensors(path)
        else:
            yield from _bin(path)


def _safetensors(path: Path):
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    for name in names:

        def read(want, slices, name=name) -> torch.Tensor:
            try:
                # opened per tensor: the pages read are unmapped when it closes
                with safe_open(str(path), framework="pt") as f:
                    part = f.get_slice(name)
                    shape = tuple(part.get_shape())
                    _check_shape(path, name, shape, want)
                    # copies, not views into the mapping: a view of some columns would
                    # keep whole rows' pages resident, and a view of rows the pages
                    # around them (the kernel's fault-around), so a rank would hold more
                    # than its shard
                    pieces = [_copy_out(part[idx]) for idx in slices(shape)]
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{path}: tensor {name} cannot be read ({e})") from None
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

        yield path, name, read


COPY_CHUNK_BYTES = 16 << 20


def _copy_out(view: torch.Tensor) -> torch.Tensor:
    """A copy of `view` (a view into a file mapping) made some MB of rows at a time, the
    mapping's pages each piece read dropped right after it: copying a tensor whole would
    hold its file pages and its copy at once, twice the tensor (a rank's largest one, the
    embeddings' slice, was most of a rank's peak over its shard)."""
    if view.ndim < 2 or view.numel() * view.element_size() <= COPY_CHUNK_BYTES:
        return view.clone(memory_format=torch.contiguous_format)
    out = torch.empty(view.shape, dtype=view.dtype)
    row_bytes = view.stride(0) * view.element_size()
    step = max(1, COPY_CHUNK_BYTES // row_bytes)
    for r0 in range(0, view.shape[0], step):
        piece = view[r0 : r0 + step]
        out[r0 : r0 + step].copy_(piece)
        # the bytes the piece spans in the mapping, first element to last (a column
        # slice's rows in between included: their pages were read whole)
        span = (piece.shape[0] - 1) * view.stride(0) + piece[0].numel()
        release_pages(torch.as_strided(piece, (span,), (1,)))
    return out


def _bin(path: Path):
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for corrupt or hostile pickles
        raise CheckpointError(
            f"{path}: not a loadable PyTorch weights file ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    for name in list(state):
        t = state.pop(name)
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name} is a {type(t).__name__}, not a tensor")

        def read(want, slices, t=t, name=name) -> torch.Tensor:
            _check_shape(path, name, tuple(t.shape), want)
            pieces = [t[idx].clone() for idx in slices(tuple(t.shape))]
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

        yield path, name, read


def _gguf_tensors(path: Path, config: ModelConfig):
    """(file, HF name, read) per tensor of a GGUF file, as _tensors gives them: a
    quantized matrix's slice is a copy of the file's blocks (whole rows, or whole blocks
    of each row), a float tensor's the model's dtype; the pages read are dropped after
    each copy, so a rank holds its shard and not the file."""
    ckpt = read_gguf(path)
    for name, t in ckpt.tensors.items():

        def read(want, slices, name=name, t=t):
            shape = file_shape(t)
            _check_shape(path, name, shape, want)
            order = row_order(ckpt, name)  # the model's row i is the file's row order[i]
            whole = torch.from_numpy(t.data)
            try:
                pieces = [_file_slice(t, whole, shape, order, idx) for idx in slices(shape)]
            except QuantError as e:
                raise CheckpointError(f"{path}: tensor {t.name}: {e}") from None
            finally:
                release_pages(whole)
            if len(pieces) == 1:
                return pieces[0]
            if isinstance(pieces[0], QuantTensor):  # QKV's parts: rows of the same blocks
                rows = sum(p.shape[0] for p in pieces)
                data = torch.cat([p.data for p in pieces])
                return QuantTensor(pieces[0].fmt, data, (rows, shape[1]))
            return torch.cat(pieces)

        yield path, name, read


def _file_slice(t, whole: torch.Tensor, shape, order, idx: tuple[slice, ...]):
    """One index tuple of a file tensor, in the model's row order, copied out of the
    mapping."""
    rows = idx[0] if order is None else order[idx[0]]
    if kept_as_blocks(t):  # rows of bytes
        fmt = get_format(t.tensor_type)
        data = whole[rows] if isinstance(rows, slice) else whole.index_select(0, rows)
        cols = shape[1]
        if len(idx) > 1:  # row-parallel: the same whole blocks of every row
            start, stop, _ = idx[1].indices(shape[1])
            cols = stop - start
            data = data[:, fmt.row_bytes(start) : fmt.row_bytes(stop)]
        return QuantTensor(
            fmt, data.clone(memory_format=torch.contiguous_format), (len(data), cols)
        )
    value = tensor_value(t, stored_dtype(t))  # a view of the mapping for a float type
    value = value[rows] if isinstance(rows, slice) else value.index_select(0, rows)
    return value[(slice(None), *idx[1:])].clone(memory_format=torch.contiguous_format)


def _join_ranks(
    model: CausalLM, config: ModelConfig, shard: Shard, shm: SharedMemoryGroup | None
) -> None:
    """Wrap the loaded modules that meet the other ranks: the row-parallel projections,
    the embeddings and the LM head."""
    arch = for_config(config).name
    for name, module in list(model.named_modules()):
        if is_row_parallel(arch, name):
            model.set_submodule(name, RowParallel(module, shm=shm))
    if arch == "falcon_h1" and config.mamba_rms_norm and config.mamba_n_groups % shard.world:
        for name, module in model.named_modules():  # one group, spread over the ranks
            if name.endswith(".mamba.norm"):
                module.reduce_squares = partial(summed, shm=shm)
                module.group_width = config.mamba_d_ssm
    rows = shard.vocab(config.vocab_size)
    embeddings = model.get_submodule(model.embeddings_name)
    model.set_submodule(
        model.embeddings_name,
        VocabParallelEmbedding(embeddings, rows.start, rows.stop, model.compute_dtype, shm=shm),
    )
    model.lm_head = GatheredHead(model.lm_head, config.vocab_size, shard.world, shm=shm)
