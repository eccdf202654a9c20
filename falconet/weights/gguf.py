"""GGUF files for Falcon and Falcon3 (llama), as llama.cpp reads and writes them.

Reading (`falconet.load("model.gguf")`): `read_gguf` checks the file and rebuilds the
config and tokenizer from its metadata; `load_gguf_weights` fills a model built on the
meta device. F32/F16/BF16 tensors become float parameters, Q8_0/Q4_0/Q4_1/Q5_0/Q5_1
tensors become QuantLinear/QuantEmbedding weights that point into the file's memory map
(no copy: the blocks are exactly what falconet.quant computes on), and Q4_K/Q5_K/Q6_K
(which llama.cpp's K-quant mixes put on some Falcon tensors) are dequantized at load.

Writing (`falconet convert HF_DIR OUT.gguf --type q4_0`): `convert_hf_to_gguf` streams a
Hugging Face folder into a GGUF with llama.cpp's `falcon` or `llama` architecture: its
tensor names, the metadata keys its loader reads, and the tensor types its quantizer
would pick. Only one tensor is in memory at a time, and the file is published atomically.

What differs per architecture lives in one module each (`LAYOUTS`, chosen by the
file's general.architecture or the config's registry entry): gguf_falcon.py (names,
metadata, the variants llama.cpp's falcon cannot run) and gguf_llama.py (Falcon3: names,
metadata, the Q/K row order of llama.cpp's rope).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from gguf import (
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
)

from falconet.durable import atomic_write
from falconet.errors import CheckpointError, ConfigError, FalconetError
from falconet.models.base import CausalLM
from falconet.models.registry import ModelConfig, for_config
from falconet.quant import QuantError, get_format
from falconet.quant.linear import QuantTensor, install
from falconet.quant.plan import tensor_qtype
from falconet.tokenizer import Tokenizer
from falconet.weights import gguf_falcon, gguf_llama, gguf_vocab
from falconet.weights.hf import checkpoint_sources, read_config

T = GGMLQuantizationType


class GGUFError(CheckpointError):
    """A GGUF file that is truncated, corrupt, not a Falcon or llama model, or uses tensor
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
}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
BLOCK_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)  # kept as blocks (QuantTensor)
DEQUANTIZED_TYPES = (T.Q4_K, T.Q5_K, T.Q6_K)  # turned into floats at load
READ_TYPES = FLOAT_TYPES + BLOCK_TYPES + DEQUANTIZED_TYPES


def write_type(hf_name: str, shape: tuple[int, ...], qtype: T, config: ModelConfig) -> T:
    """The type llama.cpp gives a tensor in a `qtype` file: 1-D tensors (norms)
    F32; for the block types, quant/plan.py's choice (the one falconet.load(quant=)
    makes: the head, or token_embd when tied, Q8_0 -- llama.cpp's quantizer does this
    for every Falcon file), with F16 for rows that split into no whole blocks, as
    llama.cpp's converter falls back."""
    if len(shape) == 1:
        return T.F32
    if qtype not in BLOCK_TYPES:
        return qtype
    chosen = tensor_qtype(hf_name, shape, config, get_format(qtype).name)
    return T(get_format(chosen).ggml_type) if chosen else T.F16


# ---- reading --------------------------------------------------------------------------


class _Truncated(Exception):
    def __init__(self, end: int, tensor: str | None) -> None:
        self.end, self.tensor = end, tensor


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
        super()._build_tensors(start_offs, fields)

    def _tensor_at(self, offset: int) -> str | None:
        for field in self.data_fields:
            if self.data_start + int(field.parts[-1][0]) == offset:
                return bytes(field.parts[1]).decode("utf-8", "replace")
        return None


_INTS = {getattr(GGUFValueType, n) for n in ("UINT8", "INT8", "UINT16", "INT16", "UINT32",
                                               "INT32", "UINT64", "INT64")}  # fmt: skip
_NUMBERS = _INTS | {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}
_REQUIRED = object()


def _value(reader: GGUFReader, path: Path, key: str, kind: str, default: Any = _REQUIRED) -> Any:
    """Metadata value `key`, checked to be of `kind` (int, float, str, bool, str[], int[])."""
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
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
class GGUFCheckpoint:
    """An opened, checked GGUF file: its config, tokenizer and tensors (by HF name)."""

    path: Path
    reader: GGUFReader  # owns the memory map the tensors point into
    config: ModelConfig
    tokenizer: Tokenizer
    tensors: dict[str, Any]  # HF name -> gguf ReaderTensor

    @property
    def nbytes(self) -> int:
        return sum(int(t.n_bytes) for t in self.tensors.values())


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Open and check a Falcon or llama GGUF file; GGUFError names the file and the problem."""
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
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError) as e:
        raise GGUFError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it may be corrupt, "
            "or use a tensor type newer than the installed gguf package knows"
        ) from None
    if reader.byte_order != "I":
        raise GGUFError(f"{path}: a big-endian GGUF file; falconet reads little-endian ones")
    try:
        return _check(reader, path)
    except UnicodeDecodeError as e:
        raise GGUFError(f"{path}: a metadata string is not UTF-8 ({e})") from None


def _check(reader: GGUFReader, path: Path) -> GGUFCheckpoint:
    arch = _value(reader, path, "general.architecture", "str")
    if arch not in LAYOUTS:
        raise GGUFError(
            f"{path}: architecture {arch!r} is not one falconet runs ({', '.join(LAYOUTS)})"
        )
    layout = LAYOUTS[arch]
    by_name = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        if t.tensor_type not in READ_TYPES:
            raise GGUFError(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}, which falconet cannot "
                f"read; falconet reads {', '.join(x.name for x in FLOAT_TYPES + BLOCK_TYPES)} "
                f"and dequantizes {', '.join(x.name for x in DEQUANTIZED_TYPES)}: use a file "
                "quantized to one of those (llama-quantize Q4_0, Q8_0, Q4_K_M...), or write one "
                "from the HF folder with `falconet convert --type q4_0`"
            )
    config = _config(reader, path, arch, by_name)
    try:
        tokenizer = gguf_vocab.tokenizer_from_metadata(_vocab_meta(reader, path), str(path))
    except GGUFError:
        raise
    except CheckpointError as e:
        raise GGUFError(str(e)) from None
    if tokenizer.vocab_size > config.vocab_size:
        raise GGUFError(
            f"{path}: {tokenizer.vocab_size} tokens but token_embd has {config.vocab_size} rows"
        )
    expected = layout.tensor_names(config)
    tensors = {}
    for name, t in by_name.items():
        if name in layout.EXTRA_TENSORS:  # read into the config
            continue
        if name not in expected:
            raise GGUFError(
                f"{path}: unexpected tensor {name} for a {config.num_hidden_layers}-layer "
                f"{config.variant} (llama.cpp's {arch} has no such tensor)"
            )
        hf_name, shape = expected[name]
        got = tuple(int(d) for d in reversed(t.shape.tolist()))
        if got != shape:
            raise GGUFError(
                f"{path}: tensor {name} has shape {got}, expected {shape} from the metadata"
            )
        tensors[hf_name] = t
    missing = [n for n in expected if n not in by_name]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise GGUFError(f"{path}: no tensor {missing[0]}{more}; the file is incomplete")
    return GGUFCheckpoint(path, reader, config, tokenizer, tensors)


def _config(reader: GGUFReader, path: Path, arch: str, tensors: dict[str, Any]) -> ModelConfig:
    """The config the metadata describes: what every architecture reads alike here, the
    rest by the architecture's layout (its `<arch>.*` keys)."""

    def key(k: str, kind: str, default: Any = _REQUIRED) -> Any:
        return _value(reader, path, f"{arch}.{k}", kind, default)

    def fail(msg: str) -> GGUFError:
        return GGUFError(f"{path}: {msg}")

    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise GGUFError(f"{path}: no tensor token_embd.weight; the file is incomplete")
    eos = _value(reader, path, gguf_vocab.KEY_EOS, "int", None)
    types = {t.tensor_type for t in tensors.values() if len(t.shape) == 2}
    # dtype="auto" keeps F16/BF16 weights as they are; K-quants are dequantized to bf16
    # (half of fp32's memory, its rounding far below theirs); otherwise fp32.
    dtype = (
        "float16" if T.F16 in types
        else "bfloat16" if types & {T.BF16, *DEQUANTIZED_TYPES}
        else "float32"
    )  # fmt: skip
    common = dict(
        vocab_size=int(embd.shape[1]),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=_value(reader, path, gguf_vocab.KEY_BOS, "int", None),
        eos_token_ids=() if eos is None else (eos,),
        pad_token_id=_value(reader, path, gguf_vocab.KEY_PAD, "int", None),
        torch_dtype=dtype,
    )
    layout = LAYOUTS[arch]
    try:
        return layout.read_config(key, fail, tensors, common)
    except ConfigError as e:
        raise GGUFError(f"{path}: the metadata is not a valid {layout.TITLE} config: {e}") from None


def _vocab_meta(reader: GGUFReader, path: Path) -> dict[str, Any]:
    meta = {}
    for key, (kind, required) in gguf_vocab.METADATA.items():
        value = _value(reader, path, key, kind, _REQUIRED if required else None)
        if value is not None:
            meta[key] = value
    return meta


def _tensor_value(
    t: Any, dtype: torch.dtype, rows: torch.Tensor | None = None
) -> QuantTensor | torch.Tensor:
    """A file tensor as falconet holds it: blocks stay blocks, the rest becomes `dtype`;
    `rows` reorders the rows (llama's Q/K), which copies."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    kind = t.tensor_type
    if kind in BLOCK_TYPES and len(shape) == 2:
        data = torch.from_numpy(t.data)
        if rows is not None:  # whole rows of blocks move: the blocks stay exact
            return QuantTensor(get_format(kind), data.index_select(0, rows), shape)
        # a view of the file's memory map: no copy (mapped: the pages are the file's)
        return QuantTensor(get_format(kind), data, shape, mapped=True)
    if kind in (T.F32, T.F16):
        out = torch.from_numpy(t.data)
    elif kind == T.BF16:
        out = torch.from_numpy(t.data).view(torch.bfloat16)
    else:  # K-quants, or a (never written) quantized 1-D tensor
        out = torch.from_numpy(get_format(kind).dequantize(t.data, shape))
    out = out.reshape(shape)
    if rows is not None:
        out = out.index_select(0, rows)
    return out.to(dtype)  # no copy when the dtype already matches


def load_gguf_weights(
    model: CausalLM, ckpt: GGUFCheckpoint, progress: Callable[[int], None] | None = None
) -> None:
    """Fill `model` (built from ckpt.config on the meta device) with the file's tensors;
    progress(nbytes) is called after each."""
    params = dict(model.named_parameters(remove_duplicate=False))
    layout = _layout(ckpt.config)
    for hf_name, t in ckpt.tensors.items():
        rows = layout.rows(hf_name, ckpt.config, False)
        try:
            value = _tensor_value(t, params[hf_name].dtype, rows)
        except QuantError as e:
            raise GGUFError(f"{ckpt.path}: tensor {t.name}: {e}") from None
        install(model, hf_name, value)
        if progress is not None:
            progress(int(t.n_bytes))
    model.tie_weights()


# ---- writing --------------------------------------------------------------------------


def check_writable(config: ModelConfig, source: str) -> None:
    """Raise GGUFError for a model llama.cpp's architecture for it cannot run."""
    reasons = _layout(config).problems(config)
    if reasons:
        raise GGUFError(
            f"{source}: a {config.variant} model cannot be written as GGUF: " + "; ".join(reasons)
        )


def _metadata(writer: GGUFWriter, config: ModelConfig, ftype: LlamaFileType, name: str) -> None:
    writer.add_type("model")
    writer.add_name(name)
    _layout(config).write_metadata(writer, config)
    writer.add_file_type(ftype)
    writer.add_quantization_version(GGML_QUANT_VERSION)


def _add_values(writer: GGUFWriter, meta: dict[str, Any]) -> None:
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


def convert_hf_to_gguf(
    folder: str | Path,
    out: str | Path,
    qtype: str = "f16",
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write the HF folder `folder` (Falcon, or llama for Falcon3) as a llama.cpp-compatible
    GGUF file `out`.

    qtype: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0 or q5_1 (see `write_type`).
    progress(done_bytes, total_bytes) is called as tensors are written. An existing
    `out` is replaced only with overwrite=True. `metadata`: more string keys to write
    (the CLI passes the model card's general.license*).
    """
    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    if qtype not in WRITE_TYPES:
        raise FalconetError(f"GGUF type {qtype!r} is not one of {', '.join(WRITE_TYPES)}")
    if not folder.is_dir():
        raise FalconetError(f"{folder}: not a folder; give a Hugging Face model folder")
    if not out.parent.is_dir():
        raise FalconetError(f"{out}: the folder {out.parent} does not exist")
    if out.is_dir():
        raise FalconetError(f"{out}: is a folder; give the path of the .gguf file to write")
    if out.exists() and not overwrite:
        raise FalconetError(f"{out}: already exists; pass --overwrite to replace it")
    config = read_config(folder)
    check_writable(config, str(folder))
    tokenizer = Tokenizer.from_dir(folder)
    vocab = gguf_vocab.vocab_metadata(tokenizer, config)
    kind, ftype = WRITE_TYPES[qtype]
    layout, arch = _layout(config), for_config(config)
    names = layout.tensor_names(config)
    to_model = arch.layout(config).transforms  # HF layout -> falconet's (Falcon's QKV)
    sources = checkpoint_sources(folder, config)
    plan = []  # (GGUF name, HF name, HF shape, GGML type, bytes)
    for name, (hf_name, shape) in names.items():
        t = write_type(hf_name, shape, kind, config)
        fmt = get_format(t)
        nbytes = math.prod(shape[:-1]) * fmt.row_bytes(shape[-1])
        plan.append((name, hf_name, shape, t, nbytes))
    extra = layout.extra_tensors(config)  # e.g. llama3's rope_freqs: F32, after the weights
    total = sum(p[-1] for p in plan) + sum(a.nbytes for a in extra.values())

    def write(tmp: Path) -> None:
        writer = GGUFWriter(tmp, arch.gguf_architecture)
        try:
            _metadata(writer, config, ftype, folder.resolve().name)
            _add_values(writer, {**(metadata or {}), **vocab})
            for name, _, shape, t, nbytes in plan:
                # A non-uint8 dtype with raw_dtype: `shape` is taken as the element shape.
                writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=t)
            for name, array in extra.items():
                writer.add_tensor_info(
                    name, array.shape, array.dtype, array.nbytes, raw_dtype=T.F32
                )
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            done = 0
            for _, hf_name, shape, t, nbytes in plan:
                path, get = sources[hf_name]
                tensor = get()
                if tuple(tensor.shape) != shape or not tensor.is_floating_point():
                    raise CheckpointError(
                        f"{path}: tensor {hf_name} is {tensor.dtype} {tuple(tensor.shape)}, "
                        f"expected a float tensor of shape {shape} from config.json"
                    )
                if hf_name in to_model:
                    tensor = to_model[hf_name](tensor)
                rows = layout.rows(hf_name, config, True)  # falconet's layout -> the file's
                if rows is not None:
                    tensor = tensor.index_select(0, rows)
                try:
                    data = _encode(tensor, t)
                except QuantError as e:
                    raise GGUFError(f"{path}: tensor {hf_name}: {e}") from None
                del tensor
                writer.write_tensor_data(data)
                del data  # before the next tensor loads: one tensor in memory at a time
                done += nbytes
                if progress is not None:
                    progress(done, total)
            for array in extra.values():
                writer.write_tensor_data(array)
            if extra and progress is not None:
                progress(total, total)
        finally:
            writer.close()

    atomic_write(out, write)


# ---- the architectures ----------------------------------------------------------------

# llama.cpp architecture -> the module describing its files. Each has ARCH, TITLE,
# EXTRA_TENSORS (file tensors that are no weight) and tensor_names(config),
# read_config(key, fail, tensors, common), problems(config), write_metadata(writer,
# config), extra_tensors(config) (name -> F32 array), rows(hf_name, config, to_file)
# (row order between falconet and the file, None = the same).
LAYOUTS: dict[str, ModuleType] = {m.ARCH: m for m in (gguf_falcon, gguf_llama)}


def _layout(config: ModelConfig) -> ModuleType:
    return LAYOUTS[for_config(config).gguf_architecture]
