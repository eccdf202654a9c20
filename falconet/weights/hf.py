"""Read the weights of a Hugging Face checkpoint folder: safetensors (sharded or not) or
legacy .bin. What the folder must hold is a `CheckpointLayout`, which the model file
provides (models/ hands it down): this module knows files, not architectures.

Tensors are streamed one at a time. A safetensors tensor that needs no change keeps
pointing into the file's memory map (no copy, pages shared with the OS cache); one that
must be converted (dtype, QKV regrouping) is converted from a mapping opened for that
tensor alone and closed right after, so the process never holds the checkpoint twice.
Legacy `pytorch_model*.bin` files go through `torch.load(weights_only=True, mmap=True)`:
no pickled code ever runs.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from falconet.errors import CheckpointError
from falconet.quant.linear import QuantTensor, install
from falconet.quant.plan import tensor_qtype

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

# Buffers that old checkpoints carry and that are recomputed, never loaded.
IGNORED_SUFFIXES = (".inv_freq", ".cos_cached", ".sin_cached", ".masked_bias", ".attn.bias")


@dataclass(frozen=True)
class CheckpointLayout:
    """What a Hugging Face checkpoint of one config holds: every tensor name with its HF
    shape, and the tiny named transforms (e.g. Falcon's `regroup_qkv`) that turn a stored
    tensor into the layout the model computes with. Names without a transform load as is.

    `skipped`: names a checkpoint may carry that are not loaded (a tied lm_head);
    `heads`: the output head's tensor (lm_head, or the embeddings it is tied to), which
    quantization keeps at Q8_0; `keep_float`: tensors quantization leaves in float whatever
    the type (Mamba's A_log and conv1d filters, as llama.cpp does; ternary layers);
    `ternary`: the weights of ternary projections (a BitNet checkpoint's), `packed`: those
    stored as uint8 codes (with a `weight_scale` beside each); `name` and
    `description` say in errors what was expected.
    """

    shapes: dict[str, tuple[int, ...]]
    transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    skipped: frozenset[str] = frozenset()
    heads: frozenset[str] = frozenset()
    keep_float: frozenset[str] = frozenset()
    ternary: frozenset[str] = frozenset()
    packed: frozenset[str] = frozenset()
    name: str = "model"
    description: str = ""


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files, in the order the index lists them."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = list(dict.fromkeys(weight_map.values()))
            except (
                ValueError,
                KeyError,
                TypeError,
                AttributeError,
                UnicodeDecodeError,
                OSError,
            ) as e:
                raise CheckpointError(
                    f"{index}: not a valid weight index ({type(e).__name__}: {e})"
                ) from None
            paths = []
            for f in files:
                # A plain file name: no "../x" or "/abs/x" that would read outside the folder.
                # The file itself may be a symlink (the huggingface_hub cache links to blobs/).
                if not isinstance(f, str) or f in ("", ".", "..") or Path(f).name != f or "\\" in f:
                    raise CheckpointError(
                        f"{index}: lists {f!r}, which is not a file name inside {folder}"
                    )
                if not (folder / f).is_file():
                    raise CheckpointError(f"{index}: lists {f}, which is not a file in {folder}")
                paths.append(folder / f)
            return paths
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if found:
        return found
    raise CheckpointError(
        f"{folder}: no model.safetensors, {SAFETENSORS_INDEX} or pytorch_model.bin; "
        "is this a Hugging Face model folder?"
    )


def _iter_safetensors(path: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}){_truncation_note(path)}"
        ) from None
    size = path.stat().st_size
    for name in names:

        def get(name: str = name) -> torch.Tensor:
            try:
                with safe_open(str(path), framework="pt") as f:
                    return f.get_tensor(name)
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise CheckpointError(
                    f"{path}: tensor {name} cannot be read ({e}); file size {size}"
                ) from None

        yield name, get


def _truncation_note(path: Path) -> str:
    """Name the first tensor a cut-off download lost, when the header is still whole."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                return ""
            header = json.loads(f.read(n))
        ends = sorted(
            (info["data_offsets"][1], name)
            for name, info in header.items()
            if name != "__metadata__"
        )
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return ""
    cut = [name for end, name in ends if not isinstance(end, int) or 8 + n + end > size]
    if not ends or not cut:
        return ""
    more = f" (and {len(cut) - 1} more)" if len(cut) > 1 else ""
    return (
        f"; the file is truncated: {size} bytes of {8 + n + ends[-1][0]}, tensor {cut[0]}{more} is cut off; "
        "download it again"
    )


def _iter_bin(path: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Pre-zip (legacy) serialization cannot be memory-mapped.
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or hostile pickles
        refused = [line for line in str(e).splitlines() if "GLOBAL" in line]
        if isinstance(e, pickle.UnpicklingError) and refused:
            # torch's own message suggests weights_only=False, which would run the pickle's code.
            raise CheckpointError(
                f"{path}: holds pickled Python objects, not only tensors ({refused[0].strip()}); "
                "refusing to load it, since that could run arbitrary code"
            ) from None
        raise CheckpointError(
            f"{path}: not a loadable PyTorch weights file ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    for name in list(state):
        t = state.pop(name)
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name} is a {type(t).__name__}, not a tensor")
        yield name, (lambda t=t: t)


def iter_checkpoint(folder: Path) -> Iterator[tuple[Path, str, Callable[[], torch.Tensor]]]:
    for path in weight_files(folder):
        reader = _iter_safetensors if path.suffix == ".safetensors" else _iter_bin
        for name, get in reader(path):
            yield path, name, get


def checkpoint_sources(
    folder: Path, layout: CheckpointLayout
) -> dict[str, tuple[Path, Callable[[], torch.Tensor]]]:
    """HF name -> (file, lazy loader) for every tensor the layout needs, in file order;
    raises CheckpointError for an unexpected, duplicated or missing tensor before any
    tensor is read."""
    expected = layout.shapes
    sources: dict[str, tuple[Path, Callable[[], torch.Tensor]]] = {}
    for path, name, get in iter_checkpoint(folder):
        if name.endswith(IGNORED_SUFFIXES) or name in layout.skipped:
            continue
        if name not in expected:
            raise CheckpointError(
                f"{path}: unexpected tensor {name}; the checkpoint does not match config.json "
                f"({layout.description})"
            )
        if name in sources:
            raise CheckpointError(f"{path}: tensor {name} also appears in {sources[name][0]}")
        sources[name] = (path, get)
    missing = [n for n in expected if n not in sources]
    if missing:
        files = ", ".join(p.name for p in weight_files(folder))
        raise CheckpointError(
            f"{folder}: checkpoint ({files}) has no tensor {missing[0]}"
            + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "")
            + f"; is this a complete {layout.name} checkpoint?"
        )
    return sources


def load_weights(
    model: nn.Module,
    folder: Path,
    layout: CheckpointLayout,
    progress: Callable[[int], None] | None = None,
    quant: str | Mapping[str, str | None] | None = None,
) -> None:
    """Fill `model` (built on the meta device, its parameters named as in the checkpoint)
    with the tensors `layout` lists. The caller re-ties a shared head afterwards.

    With `quant` (a type of falconet.quant.plan), each matrix is quantized as it is read
    (quant/plan.py picks the type per tensor) and swapped in as a QuantLinear /
    QuantEmbedding, so the float checkpoint is never held whole. A mapping instead gives
    each tensor's type by name (None or absent: float), e.g. a K-quant mix's plan.
    """
    expected = layout.shapes
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, (path, get) in checkpoint_sources(folder, layout).items():
        t = get()
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(t.shape)}, expected {expected[name]} from config.json"
            )
        packed = name in layout.packed
        if (t.dtype != torch.uint8) if packed else not t.is_floating_point():
            want = "uint8 (packed ternary codes)" if packed else "a float type"
            raise CheckpointError(f"{path}: tensor {name} has dtype {t.dtype}, expected {want}")
        target = params[name]
        if name in layout.transforms:
            t = layout.transforms[name](t)
        nbytes = t.numel() * target.element_size()
        if isinstance(quant, Mapping):  # a per-tensor plan (a K-quant mix)
            qtype = quant.get(name)
        else:
            qtype = (
                quant
                and name not in layout.keep_float
                and tensor_qtype(tuple(t.shape), quant, name in layout.heads)
            )
        if qtype:
            install(model, name, QuantTensor.quantize(t, qtype, name=f"{path.name}: {name}"))
        else:
            # (a float weight bound for packed codes is ternarized by install)
            if t.dtype != target.dtype and target.is_floating_point():
                t = t.to(target.dtype)
            install(model, name, t)
        del t
        if progress is not None:
            progress(nbytes)
