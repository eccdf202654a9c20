"""Checkpoints of the registered models: Hugging Face folders and GGUF files, both ways.

weights/ reads and writes the containers (safetensors/.bin, GGUF) without knowing an
architecture; this module tells it what each architecture's files hold:

- HF folders: the model file's `CheckpointLayout` (through the registry) says which
  tensors to expect, their shapes and transforms (`load_hf_weights`).
- GGUF: llama.cpp's names and metadata differ per architecture, one module each
  (`LAYOUTS`, chosen by the file's general.architecture or the config's registry entry):
  gguf_falcon.py (names, metadata, the variants llama.cpp's falcon cannot run),
  gguf_llama.py (Falcon3: names, metadata, the Q/K row order of llama.cpp's rope) and
  gguf_falcon_h1.py (Falcon-H1: names, reshapes, the muP multipliers folded or not) and
  gguf_mamba.py (Falcon-Mamba: names, metadata, A stored as -exp(A_log)).
  `read_gguf` rebuilds the config and the tokenizer's pieces from the metadata;
  `load_gguf_weights` fills a model built on the meta device; `write_hf_as_gguf` streams an
  HF folder into a GGUF with the tensor types llama.cpp's quantizer would pick.

The tokenizer is built above this layer (falconet.tokenizer): reading hands up its
constructor's arguments (`GGUFCheckpoint.vocab`), writing takes the tokenizer.* keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from gguf import GGUFWriter

from falconet.errors import CheckpointError, ConfigError, FalconetError
from falconet.models import gguf_falcon, gguf_falcon_h1, gguf_llama, gguf_mamba
from falconet.models.base import CausalLM
from falconet.models.registry import (
    ARCHITECTURES,
    ModelConfig,
    for_config,
    read_hf_config,
)
from falconet.quant import QuantError, get_format
from falconet.quant.linear import QuantTensor, install
from falconet.quant.mixes import mix_types
from falconet.quant.ternary import BitNetConfig, ternary_weight
from falconet.weights import gguf_vocab
from falconet.weights.gguf import (
    K_MIXES,
    REQUIRED,
    TENSOR_TYPES,
    TERNARY_TYPES,
    WRITE_TYPES,
    GGUFError,
    GGUFFile,
    T,
    TensorOut,
    file_shape,
    open_gguf,
    tensor_value,
    write_gguf,
)
from falconet.weights.gguf import write_type as _write_type
from falconet.weights.hf import checkpoint_sources, load_weights

# ---- Hugging Face folders ---------------------------------------------------------------


def read_config(folder: Path) -> ModelConfig:
    """The folder's config.json as the config class its model_type names."""
    return read_hf_config(Path(folder) / "config.json")


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, with its HF shape."""
    return for_config(config).layout(config).shapes


def load_hf_weights(
    model: CausalLM,
    folder: Path,
    progress: Callable[[int], None] | None = None,
    quant: str | None = None,
) -> None:
    """Fill `model` (built on the meta device) from the HF folder; `quant` quantizes each
    matrix as it is read (see weights.hf.load_weights): a type (q4_0...) or one of
    llama.cpp's K-quant mixes (q4_k_m...), whose per-tensor types are the ones
    `falconet convert --type` writes for this model (quant/mixes.py)."""
    config = model.config
    plan: str | dict[str, str | None] | None = quant
    if quant in K_MIXES:
        plan = load_mix_plan(quant, config)
    load_weights(model, folder, for_config(config).layout(config), progress, plan)
    model.tie_weights()


def load_mix_plan(mix: str, config: ModelConfig) -> dict[str, str | None]:
    """HF tensor name -> the block type a K-quant `mix` file of this model gives it
    (None: stays float), through the GGUF names the file would have."""
    layout, arch = _layout(config), for_config(config)
    check_writable(config, f"--quant {mix}")
    written = _file_config(layout, config)
    names = layout.tensor_names(written)
    kinds = _mix_kinds(mix, names, arch.gguf_architecture, written)
    plan: dict[str, str | None] = {}
    for name, (hf_name, _) in names.items():
        kind = kinds[name].name.lower()
        plan.setdefault(hf_name, None if kind in ("f32", "f16", "bf16") else kind)
    return plan


# ---- GGUF: reading ----------------------------------------------------------------------

# llama.cpp architecture -> the module describing its files. Each has ARCH, TITLE,
# EXTRA_TENSORS (names or globs of file tensors that are no weight) and
# tensor_names(config) (GGUF name -> (HF name, shape in the file)),
# read_config(key, fail, tensors, common), problems(config), write_metadata(writer,
# config), extra_tensors(config) (name -> F32 array), rows(hf_name, config, to_file)
# (row order between falconet and the file, None = the same). Optional, where the file
# holds other values than the checkpoint (Falcon-H1, Falcon-Mamba): file_config(config) (the config a
# file written from `config` describes), to_file / from_file(hf_name, config) (a float
# tensor's conversion each way, None = as is) and canonical_name(name) (older spellings
# of tensor names). What stays F32 in every file type is the model's to say
# (`CheckpointLayout.keep_float`), so quantizing at load keeps the same tensors float.
LAYOUTS: dict[str, ModuleType] = {
    m.ARCH: m for m in (gguf_falcon, gguf_llama, gguf_falcon_h1, gguf_mamba)
}


def _file_config(layout: ModuleType, config: ModelConfig) -> ModelConfig:
    return layout.file_config(config) if hasattr(layout, "file_config") else config


def _convert(layout: ModuleType, way: str, hf_name: str, config: ModelConfig) -> Any:
    return getattr(layout, way)(hf_name, config) if hasattr(layout, way) else None


def _layout(config: ModelConfig) -> ModuleType:
    arch = for_config(config)
    if arch.gguf_architecture not in LAYOUTS:
        raise GGUFError(_not_yet(arch.gguf_architecture, arch.name))
    return LAYOUTS[arch.gguf_architecture]


def _not_yet(gguf_arch: str, name: str) -> str:
    return (
        f"GGUF files of architecture {gguf_arch!r} ({name}) are not supported yet; "
        "use the Hugging Face folder"
    )


@dataclass
class GGUFCheckpoint:
    """An opened, checked GGUF file: its config, tokenizer pieces and tensors (by HF name)."""

    file: GGUFFile  # owns the memory map the tensors point into
    config: ModelConfig
    vocab: dict[str, Any]  # falconet.tokenizer.Tokenizer's keyword arguments
    tensors: dict[str, Any]  # HF name -> gguf ReaderTensor

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def nbytes(self) -> int:
        return sum(int(t.n_bytes) for t in self.tensors.values())


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Open and check a Falcon, llama or Falcon-H1 GGUF file; GGUFError names the file and
    the problem."""
    # registered architectures without a GGUF layout yet get their own message
    pending = {
        a.gguf_architecture: _not_yet(a.gguf_architecture, a.name)
        for a in ARCHITECTURES
        if a.gguf_architecture not in LAYOUTS
    }
    file = open_gguf(path, LAYOUTS, pending)
    try:
        return _check(file)
    except UnicodeDecodeError as e:
        raise GGUFError(f"{file.path}: a metadata string is not UTF-8 ({e})") from None


def _check(file: GGUFFile) -> GGUFCheckpoint:
    path, arch = file.path, file.architecture
    layout = LAYOUTS[arch]
    config = _config(file)
    try:
        vocab = gguf_vocab.tokenizer_from_metadata(file.values(gguf_vocab.METADATA), str(path))
    except GGUFError:
        raise
    except CheckpointError as e:
        raise GGUFError(str(e)) from None
    n_tokens = vocab["backend"].get_vocab_size(with_added_tokens=True)
    if n_tokens > config.vocab_size:
        raise GGUFError(f"{path}: {n_tokens} tokens but token_embd has {config.vocab_size} rows")
    expected = layout.tensor_names(config)
    tensors = {}
    canonical = getattr(layout, "canonical_name", str)
    for file_name, t in file.tensors.items():
        if any(fnmatchcase(file_name, p) for p in layout.EXTRA_TENSORS):  # read into the config
            continue
        name = canonical(file_name)
        if name not in expected:
            raise GGUFError(
                f"{path}: unexpected tensor {name} for a {config.num_hidden_layers}-layer "
                f"{config.variant} (llama.cpp's {arch} has no such tensor)"
            )
        hf_name, shape = expected[name]
        got = file_shape(t)
        if got != shape:
            raise GGUFError(
                f"{path}: tensor {file_name} has shape {got}, expected {shape} from the metadata"
            )
        if hf_name in tensors:
            raise GGUFError(f"{path}: tensor {file_name} appears twice (under two names)")
        tensors[hf_name] = t
    found = {canonical(n) for n in file.tensors}
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise GGUFError(f"{path}: no tensor {missing[0]}{more}; the file is incomplete")
    return GGUFCheckpoint(file, config, vocab, tensors)


def _config(file: GGUFFile) -> ModelConfig:
    """The config the metadata describes: what every architecture reads alike here, the
    rest by the architecture's layout (its `<arch>.*` keys)."""
    path, arch, tensors = file.path, file.architecture, file.tensors

    def key(k: str, kind: str, default: Any = REQUIRED) -> Any:
        return file.value(f"{arch}.{k}", kind, default)

    def fail(msg: str) -> GGUFError:
        return GGUFError(f"{path}: {msg}")

    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise GGUFError(f"{path}: no tensor token_embd.weight; the file is incomplete")
    eos = file.value(gguf_vocab.KEY_EOS, "int", None)
    types = {t.tensor_type for t in tensors.values() if len(t.shape) == 2}
    # dtype="auto" keeps F16/BF16 weights as they are; otherwise fp32 (block types,
    # K-quants and ternary ones included, stay blocks and compute in fp32 as llama.cpp does).
    dtype = "float16" if T.F16 in types else "bfloat16" if T.BF16 in types else "float32"
    common = dict(
        vocab_size=int(embd.shape[1]),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=file.value(gguf_vocab.KEY_BOS, "int", None),
        eos_token_ids=() if eos is None else (eos,),
        pad_token_id=file.value(gguf_vocab.KEY_PAD, "int", None),
        torch_dtype=dtype,
    )
    layout = LAYOUTS[arch]
    try:
        return layout.read_config(key, fail, tensors, common)
    except ConfigError as e:
        raise GGUFError(f"{path}: the metadata is not a valid {layout.TITLE} config: {e}") from None


def row_order(ckpt: GGUFCheckpoint, hf_name: str) -> torch.Tensor | None:
    """The file rows of HF tensor `hf_name` in the model's order (`model = file[order]`),
    None when they are the same (all but llama's Q and K)."""
    return _layout(ckpt.config).rows(hf_name, ckpt.config, False)


def load_gguf_weights(
    model: CausalLM, ckpt: GGUFCheckpoint, progress: Callable[[int], None] | None = None
) -> None:
    """Fill `model` (built from ckpt.config on the meta device) with the file's tensors;
    progress(nbytes) is called after each."""
    params = dict(model.named_parameters(remove_duplicate=False))
    layout = _layout(ckpt.config)
    for hf_name, t in ckpt.tensors.items():
        rows = row_order(ckpt, hf_name)
        dtype = params[hf_name].dtype
        convert = _convert(layout, "from_file", hf_name, ckpt.config)
        try:
            # a converted tensor is converted in fp32, then stored in the model's dtype
            value = tensor_value(t, torch.float32 if convert else dtype, rows)
        except QuantError as e:
            raise GGUFError(f"{ckpt.path}: tensor {t.name}: {e}") from None
        if convert is not None:
            if isinstance(value, QuantTensor):
                raise GGUFError(
                    f"{ckpt.path}: tensor {t.name} is {t.tensor_type.name}; llama.cpp keeps it "
                    "in F32 (a float type is needed)"
                )
            try:
                value = convert(value).to(dtype)
            except ValueError as e:  # a value the file's form cannot hold (a positive A)
                raise GGUFError(f"{ckpt.path}: tensor {t.name}: {e}") from None
        install(model, hf_name, value)
        if progress is not None:
            progress(int(t.n_bytes))
    model.tie_weights()


# ---- GGUF: writing ----------------------------------------------------------------------


def _ternary_weight(
    hf_name: str, stored: torch.Tensor, sources: dict, bitnet: BitNetConfig, path: Path
) -> torch.Tensor:
    scale_name = hf_name.removesuffix("weight") + "weight_scale"
    scale = sources[scale_name][1]() if scale_name in sources else None
    try:
        return ternary_weight(stored, scale, bitnet)
    except ValueError as e:
        raise CheckpointError(f"{path}: tensor {hf_name}: {e}") from None


def write_type(hf_name: str, shape: tuple[int, ...], qtype: T, config: ModelConfig) -> T:
    """The type llama.cpp gives HF tensor `hf_name` in a `qtype` file of this model (the
    output head, or the embeddings a tied head shares, at Q8_0; F32 for what the model's
    layout keeps float and what llama.cpp keeps F32)."""
    arch = for_config(config)
    hf_layout = arch.layout(config)
    if hf_name in hf_layout.keep_float - hf_layout.ternary:
        return T.F32
    head = hf_name in hf_layout.heads
    if qtype in TERNARY_TYPES:  # llama.cpp's converter: embeddings and head alike at F16
        head = head or hf_name == f"{arch.model.embeddings_name}.weight"
    return _write_type(shape, qtype, head)


def _mix_kinds(
    mix: str, names: dict[str, tuple[str, tuple[int, ...]]], architecture: str, config: ModelConfig
) -> dict[str, T]:
    """Each tensor's type in a K-quant `mix` file, as llama-quantize picks it (quant/mixes.py)
    from a float file of this model; what the model's layout keeps float stays F32."""
    hf_layout = for_config(config).layout(config)
    keep = hf_layout.keep_float - hf_layout.ternary
    quantized = {name: shape for name, (hf, shape) in names.items() if hf not in keep}
    # llama.cpp's n_gqa: attention heads per KV head as the file states them
    heads = getattr(config, "num_attention_heads", 0)
    kv = getattr(config, "kv_heads", None) or getattr(config, "num_key_value_heads", None) or heads
    chosen = mix_types(
        mix, quantized, architecture, config.num_hidden_layers, heads // kv if kv else 0
    )
    return {name: T[chosen.get(name, "f32").upper()] for name in names}


def _tensor_type(name: str, shape: tuple[int, ...], chosen: str) -> T:
    """GGML type `chosen` for tensor `name`, if its rows split into whole blocks of it."""
    block = get_format(chosen).block_size
    if shape[-1] % block:
        raise FalconetError(
            f"tensor {name}: rows of {shape[-1]} values do not split into whole "
            f"{block}-value blocks of {chosen}; choose another type for it"
        )
    return TENSOR_TYPES[chosen]


def check_writable(config: ModelConfig, source: str) -> None:
    """Raise GGUFError for a model llama.cpp's architecture for it cannot run."""
    reasons = _layout(config).problems(config)
    if reasons:
        raise GGUFError(
            f"{source}: a {config.variant} model cannot be written as GGUF: " + "; ".join(reasons)
        )


def write_hf_as_gguf(
    folder: str | Path,
    out: str | Path,
    qtype: str,
    vocab: Callable[[ModelConfig], dict[str, Any]],
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
    output_type: str | None = None,
    embedding_type: str | None = None,
) -> None:
    """Write the HF folder `folder` (Falcon, llama for Falcon3, or Falcon-H1 with its
    multipliers folded into the weights) as a llama.cpp-compatible GGUF file `out`.

    qtype: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, tq1_0 or tq2_0 (see `write_type`),
    or one of llama.cpp's K-quant mixes q4_k_m, q5_k_m, q6_k, q4_k_s, q5_k_s, q3_k_s,
    q3_k_m, q3_k_l, q2_k (see quant/mixes.py;
    a BitNet checkpoint's ternary matrices are written as the floats they stand for, which
    the TQ types hold exactly up to their float16 scale). vocab(config)
    gives the tokenizer.* keys. progress(done_bytes, total_bytes) is called as tensors
    are written. An existing `out` is replaced only with overwrite=True. output_type /
    embedding_type (a TENSOR_TYPES name) set the output head's / the token embeddings'
    type as llama-quantize's --output-tensor-type / --token-embedding-type do (the
    first applies to the embeddings where the head is tied to them; the second wins).
    """
    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    if qtype not in WRITE_TYPES:
        raise FalconetError(f"GGUF type {qtype!r} is not one of {', '.join(WRITE_TYPES)}")
    for chosen in (output_type, embedding_type):
        if chosen is not None and chosen not in TENSOR_TYPES:
            raise FalconetError(f"tensor type {chosen!r} is not one of {', '.join(TENSOR_TYPES)}")
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
    values = vocab(config)
    kind, ftype = WRITE_TYPES[qtype]
    layout, arch = _layout(config), for_config(config)
    hf_layout = arch.layout(config)
    to_model = hf_layout.transforms  # HF layout -> falconet's (Falcon's QKV)
    sources = checkpoint_sources(folder, hf_layout)
    # What the file describes: Falcon-H1's multipliers folded into the weights, its head
    # untied where one matrix cannot hold both multipliers (lm_head from the embeddings).
    written = _file_config(layout, config)
    embeddings = f"{arch.model.embeddings_name}.weight"

    def source(hf_name: str) -> str:
        return embeddings if hf_name not in sources and hf_name == "lm_head.weight" else hf_name

    def loader(hf_name: str) -> Callable[[], torch.Tensor]:
        shape = hf_layout.shapes[source(hf_name)]
        to_file = _convert(layout, "to_file", hf_name, config)
        if hf_name in hf_layout.packed:
            shape = (shape[0] * 4, shape[1])

        def load() -> torch.Tensor:
            path, get = sources[source(hf_name)]
            tensor = get()
            if hf_name in hf_layout.ternary:  # a BitNet projection: the matrix it stands for
                tensor = _ternary_weight(hf_name, tensor, sources, config.bitnet, path)
            if tuple(tensor.shape) != shape or not tensor.is_floating_point():
                raise CheckpointError(
                    f"{path}: tensor {source(hf_name)} is {tensor.dtype} "
                    f"{tuple(tensor.shape)}, expected a float tensor of shape {shape} from "
                    "config.json"
                )
            if hf_name in to_model:
                tensor = to_model[hf_name](tensor)
            rows = layout.rows(hf_name, config, True)  # falconet's layout -> the file's
            if rows is not None:
                tensor = tensor.index_select(0, rows)
            return tensor if to_file is None else to_file(tensor)

        return load

    names = layout.tensor_names(written)
    if qtype in K_MIXES:
        kinds = _mix_kinds(qtype, names, arch.gguf_architecture, written)
    else:
        kinds = {name: write_type(hf, shape, kind, written) for name, (hf, shape) in names.items()}
    head = "output.weight" if "output.weight" in names else "token_embd.weight"
    for name, chosen in ((head, output_type), ("token_embd.weight", embedding_type)):
        if chosen is not None and name in names:
            kinds[name] = _tensor_type(name, names[name][1], chosen)
    tensors = [
        TensorOut(
            name,
            shape,
            kinds[name],
            loader(hf_name),
            f"{sources[source(hf_name)][0]}: tensor {source(hf_name)}",
        )
        for name, (hf_name, shape) in names.items()
    ]

    def metadata(writer: GGUFWriter) -> None:
        writer.add_name(folder.resolve().name)
        layout.write_metadata(writer, config)

    # e.g. llama3's rope_freqs: F32, after the weights
    extra = layout.extra_tensors(config)
    write_gguf(out, arch.gguf_architecture, metadata, ftype, values, tensors, extra, progress)
