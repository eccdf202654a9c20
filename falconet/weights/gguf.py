"""GGUF files as llama.cpp reads and writes them: the container, not the architectures.

Reading: `open_gguf` checks a file (magic, truncation, byte order, tensor types falconet
can hold) and gives its metadata (`GGUFFile.value`, type-checked) and tensors by GGUF
name; `tensor_value` turns a file tensor into what falconet computes with: F32/F16/BF16
become float tensors; Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, the K-quants Q2_K..Q6_K and the ternary
TQ1_0/TQ2_0 blocks become QuantTensors that point into the file's memory map (no copy;
the compiled kernels run on those bytes).

Writing: `write_gguf` streams a list of tensors into a file published atomically, one
tensor in memory at a time, each in the type `write_type` picks as llama.cpp's quantizer
would. Which tensors and which metadata an architecture has is the model side's
business (models/checkpoint.py with one models/gguf_<arch>.py per architecture).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
)

from falconet.durable import atomic_write
from falconet.errors import CheckpointError
from falconet.quant import QuantError, get_format
from falconet.quant.linear import QuantTensor, release_pages
from falconet.quant.plan import tensor_qtype

T = GGMLQuantizationType


class GGUFError(CheckpointError):
    """A GGUF file that is truncated, corrupt, not a model falconet runs, or uses tensor
    types falconet cannot read."""


# ---- types ------------------------------------------------------------------------------

# --type names -> (type of the 2-D weights, general.file_type as llama.cpp numbers it)
WRITE_TYPES: dict[str, tuple[T, LlamaFileType]] = {
    "f32": (T.F32, LlamaFileType.ALL_F32),
    "f16": (T.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (T.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (T.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q5_0": (T.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q5_1": (T.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "tq1_0": (T.TQ1_0, LlamaFileType.MOSTLY_TQ1_0),
    "tq2_0": (T.TQ2_0, LlamaFileType.MOSTLY_TQ2_0),
    # llama.cpp's K-quant mixes: the type of the bulk of the matrices; quant/mixes.py
    # picks each tensor's
    "q4_k_m": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_m": (T.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "q6_k": (T.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "q4_k_s": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "q5_k_s": (T.Q5_K, LlamaFileType.MOSTLY_Q5_K_S),
    "q3_k_s": (T.Q3_K, LlamaFileType.MOSTLY_Q3_K_S),
    "q3_k_m": (T.Q3_K, LlamaFileType.MOSTLY_Q3_K_M),
    "q3_k_l": (T.Q3_K, LlamaFileType.MOSTLY_Q3_K_L),
    "q2_k": (T.Q2_K, LlamaFileType.MOSTLY_Q2_K),
}
# One tensor's type, as llama-quantize's --output-tensor-type / --token-embedding-type
# set it (`falconet convert`): the float and block types falconet writes; not the
# ternary ones, which only hold matrices that are ternary already.
TENSOR_TYPES: dict[str, T] = {
    n: getattr(T, n.upper())
    for n in ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k",
              "q4_k", "q5_k", "q6_k")
}  # fmt: skip
K_MIXES = ("q4_k_m", "q5_k_m", "q6_k", "q4_k_s", "q5_k_s", "q3_k_s", "q3_k_m", "q3_k_l", "q2_k")
# llama.cpp's ternary types: a TQ file holds a BitNet model as a plain Llama whose
# matrices are ternary codes with a scale per 256 values (the matrix's scale, repeated).
# Kept as blocks: the compiled kernel multiplies TQ2_0's codes as they lie in the file.
TERNARY_TYPES = (T.TQ1_0, T.TQ2_0)
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
BLOCK_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)  # kept as blocks (QuantTensor)
KQUANT_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)  # kept as blocks too
READ_TYPES = FLOAT_TYPES + BLOCK_TYPES + KQUANT_TYPES + TERNARY_TYPES


def is_gguf(path: Path) -> bool:
    """A .gguf name, or a file of any name that starts with GGUF's magic bytes."""
    if path.suffix == ".gguf":
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # missing, a folder, unreadable: not for the GGUF loader to explain
        return False


def write_type(shape: tuple[int, ...], qtype: T, head: bool = False) -> T:
    """The type llama.cpp gives a tensor in a `qtype` file: 1-D tensors (norms)
    F32; for the block types, quant/plan.py's choice (the one falconet.load(quant=)
    makes: the output `head` Q8_0 -- llama.cpp's quantizer does this for every Falcon
    file), with F16 for rows that split into no whole blocks, as llama.cpp's converter
    falls back. In a ternary (TQ) file, llama.cpp's converter keeps the embeddings and
    the head (`head` here) at F16, and rows that split into no whole blocks too."""
    if len(shape) == 1:
        return T.F32
    if qtype in TERNARY_TYPES:
        return T.F16 if head or shape[1] % get_format(qtype).block_size else qtype
    if qtype not in BLOCK_TYPES:
        return qtype
    chosen = tensor_qtype(shape, get_format(qtype).name, head)
    return T(get_format(chosen).ggml_type) if chosen else T.F16


# ---- reading --------------------------------------------------------------------------


class _Truncated(Exception):
    def __init__(self, end: int, tensor: str | None) -> None:
        self.end, self.tensor = end, tensor


class _BadTensor(Exception):
    def __init__(self, tensor: str, problem: str) -> None:
        self.tensor, self.problem = tensor, problem


class _Reader(GGUFReader):
    """gguf's reader, with reads past the end of the file reported as truncation (the
    stock reader returns a short array there, which later fails with an unrelated error)."""

    data_fields: tuple = ()  # the tensor infos, once the header has been read

    def _get(self, offset, dtype, count=1, override_order=None):
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > self.data.size:
            raise _Truncated(end, self._tensor_at(int(offset)))
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs, fields) -> None:
        self.data_start, self.data_fields = start_offs, fields
        for field in fields:  # before the stock reader, whose errors name no tensor
            _, name, _, dims, kind, _ = field.parts
            block, type_size = GGML_QUANT_SIZES.get(int(kind[0]), (1, 1))
            if len(dims) and int(dims[0]) % block:
                raise _BadTensor(
                    bytes(name).decode("utf-8", "replace"),
                    f"rows of {int(dims[0])} values do not split into whole {block}-value "
                    f"blocks of {T(int(kind[0])).name} ({type_size} bytes each)",
                )
        super()._build_tensors(start_offs, fields)

    def _tensor_at(self, offset: int) -> str | None:
        for field in self.data_fields:
            if self.data_start + int(field.parts[-1][0]) == offset:
                return bytes(field.parts[1]).decode("utf-8", "replace")
        return None


_INTS = {getattr(GGUFValueType, n) for n in ("UINT8", "INT8", "UINT16", "INT16", "UINT32",
                                               "INT32", "UINT64", "INT64")}  # fmt: skip
_NUMBERS = _INTS | {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}
REQUIRED = object()


def _value(reader: GGUFReader, path: Path, key: str, kind: str, default: Any = REQUIRED) -> Any:
    """Metadata value `key`, checked to be of `kind` (int, float, str, bool, str[], int[])."""
    field = reader.get_field(key)
    if field is None:
        if default is REQUIRED:
            raise GGUFError(
                f"{path}: metadata key {key} is missing; llama.cpp's loader needs it too, so the "
                "file is incomplete or was not written for llama.cpp"
            )
        return default
    t, sub = field.types[0], field.types[-1]
    ok = {
        "int": t in _INTS,
        "float": t in _NUMBERS,
        "str": t == GGUFValueType.STRING,
        "bool": t == GGUFValueType.BOOL,
        "str[]": t == GGUFValueType.ARRAY
        and (len(field.types) == 1 or sub == GGUFValueType.STRING),
        "int[]": t == GGUFValueType.ARRAY and (len(field.types) == 1 or sub in _INTS),
    }[kind]
    value = field.contents() if ok else None
    if not ok or (kind == "int" and value < 0):
        raise GGUFError(
            f"{path}: metadata key {key} should be {kind.replace('[]', ' array')}, got "
            f"{'/'.join(ty.name for ty in field.types)}{'' if value is None else f' {value!r}'}"
        )
    if kind == "float" and t == GGUFValueType.FLOAT32:
        # float32 written from a decimal (1e-05): its shortest repr gives that decimal back.
        value = float(str(np.float32(value)))
    return value


def metadata_strings(reader: GGUFReader, keys: Iterable[str]) -> dict[str, str]:
    """The string values among metadata `keys` (informational keys such as general.license:
    one absent, of another type or not UTF-8 is left out, never an error)."""
    out = {}
    for key in keys:
        field = reader.get_field(key)
        if field is None or field.types != [GGUFValueType.STRING]:
            continue
        try:
            out[key] = field.contents()
        except UnicodeDecodeError:
            continue
    return out


@dataclass
class GGUFFile:
    """An opened, checked GGUF file: its architecture and its tensors by GGUF name."""

    path: Path
    reader: GGUFReader  # owns the memory map the tensors point into
    architecture: str
    tensors: dict[str, Any]  # GGUF name -> gguf ReaderTensor

    def value(self, key: str, kind: str, default: Any = REQUIRED) -> Any:
        """Metadata `key`, checked to be of `kind`; GGUFError when it is not (or is
        missing without a default)."""
        return _value(self.reader, self.path, key, kind, default)

    def values(self, table: dict[str, tuple[str, bool]]) -> dict[str, Any]:
        """The keys of `table` (key -> (kind, required)) that the file holds."""
        out = {}
        for key, (kind, required) in table.items():
            value = self.value(key, kind, REQUIRED if required else None)
            if value is not None:
                out[key] = value
        return out


def open_gguf(
    path: str | Path, architectures: Collection[str], pending: Mapping[str, str] | None = None
) -> GGUFFile:
    """Open and check a GGUF file of one of `architectures` (general.architecture);
    GGUFError names the file and the problem. `pending`: architectures falconet knows but
    cannot read from GGUF yet -> what to tell the user instead."""
    pending = pending or {}
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if len(magic) < 4:
        raise GGUFError(f"{path}: truncated GGUF file ({size} bytes); download or convert it again")
    if magic != b"GGUF":
        raise GGUFError(
            f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); falconet loads "
            ".gguf files and Hugging Face model folders"
        )
    try:
        # mode "c": copy-on-write pages, so torch gets writable arrays without copying.
        reader = _Reader(path, mode="c")
    except _Truncated as e:
        where = f"tensor {e.tensor} is cut off" if e.tensor else "the header is cut off"
        raise GGUFError(
            f"{path}: truncated GGUF file: {size} bytes, but it needs at least {e.end} "
            f"({where}); download or convert it again"
        ) from None
    except _BadTensor as e:
        raise GGUFError(
            f"{path}: tensor {e.tensor} is malformed: {e.problem}; the file is corrupt or was "
            "not written by a GGUF writer"
        ) from None
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError) as e:
        raise GGUFError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it may be corrupt, "
            "or use a tensor type newer than the installed gguf package knows"
        ) from None
    if reader.byte_order != "I":
        raise GGUFError(f"{path}: a big-endian GGUF file; falconet reads little-endian ones")
    arch = _value(reader, path, "general.architecture", "str")
    if arch in pending:
        raise GGUFError(f"{path}: {pending[arch]}")
    if arch not in architectures:
        raise GGUFError(
            f"{path}: architecture {arch!r} is not one falconet runs ({', '.join(architectures)})"
        )
    for t in reader.tensors:
        if t.tensor_type not in READ_TYPES:
            raise GGUFError(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}, which falconet cannot "
                f"read; falconet reads "
                f"{', '.join(x.name for x in READ_TYPES)}: use a file "
                "quantized to one of those (llama-quantize Q4_0, Q8_0, Q4_K_M...), or write one "
                "from the HF folder with `falconet convert --type q4_0`"
            )
    return GGUFFile(path, reader, arch, {t.name: t for t in reader.tensors})


def file_shape(t: Any) -> tuple[int, ...]:
    """A file tensor's shape in PyTorch order (GGUF lists the fastest dimension first)."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def kept_as_blocks(t: Any) -> bool:
    """Whether falconet holds a file tensor as its GGML blocks (a QuantTensor)."""
    return t.tensor_type in BLOCK_TYPES + KQUANT_TYPES + TERNARY_TYPES and len(t.shape) == 2


def block_size(t: Any) -> int:
    """Values per block of a file tensor's type (1 for float types)."""
    return 1 if t.tensor_type in FLOAT_TYPES else get_format(t.tensor_type).block_size


def stored_dtype(t: Any) -> torch.dtype:
    """The torch dtype that holds a file tensor's values without rounding (float32 for
    blocks that are dequantized)."""
    return {T.F16: torch.float16, T.BF16: torch.bfloat16}.get(t.tensor_type, torch.float32)


def tensor_value(
    t: Any, dtype: torch.dtype, rows: torch.Tensor | None = None
) -> QuantTensor | torch.Tensor:
    """A file tensor as falconet holds it: blocks stay blocks, the rest becomes `dtype`;
    `rows` reorders the rows (llama's Q/K), which copies."""
    shape = file_shape(t)
    kind = t.tensor_type
    if kept_as_blocks(t):
        data = torch.from_numpy(t.data)
        if rows is not None:  # whole rows of blocks move: the blocks stay exact
            moved = QuantTensor(get_format(kind), data.index_select(0, rows), shape)
            release_pages(data)  # the copy replaces the file's pages: hold one, not both
            return moved
        # a view of the file's memory map: no copy (mapped: the pages are the file's)
        return QuantTensor(get_format(kind), data, shape, mapped=True)
    if kind in (T.F32, T.F16):
        out = torch.from_numpy(t.data)
    elif kind == T.BF16:
        out = torch.from_numpy(t.data).view(torch.bfloat16)
    else:  # ternary types, or a (never written) quantized 1-D tensor
        out = torch.from_numpy(get_format(kind).dequantize(t.data, shape))
    out = out.reshape(shape)
    if rows is not None:
        out = out.index_select(0, rows)
    return out.to(dtype)  # no copy when the dtype already matches


# ---- writing --------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorOut:
    """One tensor to write: its GGUF name, PyTorch-order shape and GGML type, and how to
    get it as a float tensor in the file's row order (read when its turn comes)."""

    name: str
    shape: tuple[int, ...]
    kind: T
    load: Callable[[], torch.Tensor]
    source: str  # where it comes from, for errors: "file: tensor name"

    @property
    def nbytes(self) -> int:
        fmt = get_format(self.kind)
        rows = 1
        for d in self.shape[:-1]:
            rows *= d
        return rows * fmt.row_bytes(self.shape[-1])


def add_values(writer: GGUFWriter, meta: dict[str, Any]) -> None:
    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)


def _encode(t: torch.Tensor, kind: T) -> np.ndarray:
    """A float tensor -> its bytes in GGML type `kind` (uint8 [rows, row_bytes]), through
    QuantTensor.quantize (chunked, compiled where built) for the matrices."""
    fmt = get_format(kind)
    if t.ndim == 1:
        return fmt.quantize(t.to(torch.float32).numpy())
    return QuantTensor.quantize(t, fmt.name).data.numpy()


def write_gguf(
    out: Path,
    architecture: str,
    metadata: Callable[[GGUFWriter], None],
    file_type: LlamaFileType,
    values: dict[str, Any],
    tensors: list[TensorOut],
    extra: dict[str, np.ndarray] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write a GGUF file at `out` (atomically: temp file, fsync, rename).

    metadata(writer) adds general.name and the architecture's `<arch>.*` keys; `values`
    are plain keys added after them (the tokenizer.* keys); `tensors` are written in order, one in memory at a time; `extra` are
    F32 arrays that are no weight (llama3's rope_freqs), written after them.
    progress(done_bytes, total_bytes) is called as tensors are written.
    """
    extra = extra or {}
    total = sum(t.nbytes for t in tensors) + sum(a.nbytes for a in extra.values())

    def write(tmp: Path) -> None:
        writer = GGUFWriter(tmp, architecture)
        try:
            writer.add_type("model")
            metadata(writer)
            writer.add_file_type(file_type)
            writer.add_quantization_version(GGML_QUANT_VERSION)
            add_values(writer, values)
            for t in tensors:
                # A non-uint8 dtype with raw_dtype: `shape` is taken as the element shape.
                writer.add_tensor_info(
                    t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.kind
                )
            for name, array in extra.items():
                writer.add_tensor_info(
                    name, array.shape, array.dtype, array.nbytes, raw_dtype=T.F32
                )
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            done = 0
            for t in tensors:
                tensor = t.load()
                try:
                    data = _encode(tensor, t.kind)
                except QuantError as e:
                    raise GGUFError(f"{t.source}: {e}") from None
                del tensor
                writer.write_tensor_data(data)
                del data  # before the next tensor loads: one tensor in memory at a time
                done += t.nbytes
                if progress is not None:
                    progress(done, total)
            for array in extra.values():
                writer.write_tensor_data(array)
            if extra and progress is not None:
                progress(total, total)
        finally:
            writer.close()

    atomic_write(out, write)
