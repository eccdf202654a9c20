"""Quantized layers: `QuantLinear` and `QuantEmbedding`, module swaps for `Linear` and
`nn.Embedding` whose weight is kept as GGML blocks.

The weight is stored exactly as a GGUF file stores it: a uint8 tensor [out_features,
row_bytes], each row `in_features / block_size` blocks of the format's bytes. So a GGUF
tensor maps in without a copy and one written back is byte-identical. The quant type
lives in the module (`qtype`) and in the file's metadata, never in a tensor name.

`QuantLinear.forward` picks the path (kernels.py):

- CPU with the compiled kernels: integer dot products with the activations rounded to
  8 bits per block, as llama.cpp computes them. Q4_0/Q4_1/Q8_0 are repacked at the
  first forward into tiles of 8 interleaved rows (`layout == "x8"`, same bytes
  permuted; `weight` still reads back GGML blocks) that serve decode and prompts alike;
  the K-quants (Q2_K..Q6_K) run in the file's blocks against Q8_K activations.
  The ternary types run as TQ2_0 blocks, repacked at the first forward into tiles of 8
  interleaved rows (`layout == "tq2_x8"`; TQ1_0 transcoded first: the same codes and
  scales; `weight` reads back the file's type), or as rows where the row count is not
  a multiple of 8 (TQ2_0's own rows in place, TQ1_0's transcoded: `layout == "tq2_0"`).
- CUDA with Triton, Q4_0 / Q8_0: Triton dequantize-matmul kernels.
- anything else: dequantize a tile of output rows and matmul.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from falconet.quant import QuantError, QuantFormat, get_format, kernels
from falconet.quant.ternary import TernaryLinear

# Held while a QuantLinear switches its layout (once per layer, at its first forward) and
# while a reader takes the (blocks, layout) pair, so a request thread never pairs one
# layout with the other's bytes. Module-level: a lock attribute would make modules
# impossible to deep-copy.
LAYOUT_LOCK = threading.Lock()

# fp32 values converted per quantization step (1 MB): with two in flight and the
# codecs' temporaries, a few tens of MB beside the weights.
QUANT_CHUNK_VALUES = 1 << 18


@dataclass(frozen=True)
class QuantTensor:
    """A 2-D weight held as GGML blocks: `data` uint8 [rows, cols/block_size*type_size]."""

    fmt: QuantFormat
    data: torch.Tensor
    shape: tuple[int, int]  # (rows, cols) of the float tensor it stands for
    mapped: bool = False  # data is a view of a read-only file mapping (a GGUF)

    def __post_init__(self) -> None:
        rows, cols = self.shape
        want = (rows, self.fmt.row_bytes(cols))
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != want:
            raise QuantError(
                f"{self.fmt.name} tensor of shape {self.shape} needs uint8 {want} bytes, "
                f"got {self.data.dtype} {tuple(self.data.shape)}"
            )

    @classmethod
    def quantize(cls, w: torch.Tensor, qtype: str | int, name: str = "tensor") -> QuantTensor:
        """Quantize a float [rows, cols] tensor (any float dtype) to GGML blocks.

        Rows go in chunks converted to fp32 one at a time, two chunks in flight (numpy
        releases the GIL), so the only large allocation is the result: quantizing at load
        holds the source tensor, its blocks and a few MB, never a whole fp32 copy.
        """
        fmt = get_format(qtype)
        if w.ndim != 2:
            raise QuantError(
                f"{name}: {fmt.name} quantizes 2-D weights, got shape {tuple(w.shape)}"
            )
        rows, cols = int(w.shape[0]), int(w.shape[1])
        out = torch.empty(rows, fmt.row_bytes(cols), dtype=torch.uint8)
        src = w.detach().to("cpu")
        step = max(1, QUANT_CHUNK_VALUES // max(cols, 1))

        def run(r0: int) -> None:
            r1 = min(r0 + step, rows)
            chunk = src[r0:r1].to(torch.float32).contiguous()
            if kernels.quantize_into(fmt, chunk, out[r0:r1]):
                return
            try:
                raw = fmt.quantize(chunk.numpy())
            except QuantError as e:
                raise QuantError(f"{name} (rows {r0}..{r1 - 1} of {rows}): {e}") from None
            out[r0:r1] = torch.from_numpy(raw)

        starts = range(0, rows, step)
        if len(starts) > 1:
            with ThreadPoolExecutor(max_workers=min(2, torch.get_num_threads())) as pool:
                list(pool.map(run, starts))
        elif starts:
            run(0)
        return cls(fmt, out, (rows, cols))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return kernels.dequantize(self.fmt, self.data, self.shape[1]).to(dtype)

    @property
    def nbytes(self) -> int:
        return self.data.numel()


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W in GGML blocks (`weight_blocks`) and an optional float bias."""

    def __init__(
        self, weight: QuantTensor, bias: torch.Tensor | None = None, repack: bool = True
    ) -> None:
        super().__init__()
        self.fmt = weight.fmt
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_blocks", weight.data, persistent=True)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # "ggml" rows, or after the first CPU forward where the compiled kernels have
        # them "x8" tiles or, for the ternary types, TQ2_0 blocks in tiles ("tq2_x8") or
        # rows ("tq2_0", TQ1_0's transcoded) (kernels.cpu_layout)
        self.layout = "ggml"
        self.repack = repack
        self.mapped = weight.mapped
        self._code = kernels.X8_CODES.get(self.fmt.name, 0)  # GGML type id of the x8 kernel
        # the layout in which this weight is TQ2_0 blocks the compiled kernel reads, if any
        self._tq2_layout = kernels.tq2_layout(self.fmt, self.out_features)
        self._tq2_tiles = self._tq2_layout == kernels.TQ2_TILES
        # K-quants without an x8 layout run in their GGUF blocks (never repacked, so no
        # layout switch to guard); Q4_K takes the layout switch below like Q4_0
        self._kquant = (
            kernels.kquant_available(self.fmt) and self.fmt.name not in kernels.KQ_X8_TYPES
        )
        # modules reading the same blocks (a tied embedding); they follow a repack
        self.shared: list[nn.Module] = []

    @property
    def qtype(self) -> str:
        return self.fmt.name

    @property
    def weight(self) -> QuantTensor:
        """The weight as GGML blocks of its type (a copy when the layer holds another
        layout)."""
        return ggml_weight(self, (self.out_features, self.in_features))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, qtype={self.qtype}"

    def _apply(self, fn, recurse: bool = True):
        # .to(device) converts each module's buffers separately, which would give a tied
        # embedding its own copy of the blocks: point it back at the head's.
        super()._apply(fn, recurse)
        for m in self.shared:
            m.weight_blocks, m.layout = self.weight_blocks, self.layout
        return self

    def _set_layout(self, layout: str) -> None:
        # The repacked copy replaces the buffer, so the old bytes (or the GGUF mapping's
        # pages) are released once nothing else holds them.
        old = self.weight_blocks
        self.weight_blocks = kernels.relayout(
            self.fmt, old.cpu(), self.in_features, self.layout, layout
        ).to(old.device)
        self.layout = layout
        if self.mapped:  # the file's pages we just read would stay in this process's RSS
            release_pages(old)
            self.mapped = False
        for m in self.shared:
            m.weight_blocks, m.layout = self.weight_blocks, layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "x8" and x.device.type == "cpu":  # the hot path, kept short
            # (a layout switch swaps the buffer before it sets "x8", so this pair is whole)
            y = kernels.x8_linear(x, self._code, self.weight_blocks, self.out_features)
        elif self.layout == self._tq2_layout and x.device.type == "cpu":  # ternary, as hot
            y = kernels.tq2_linear(x, self.weight_blocks, self.out_features, self._tq2_tiles)
        elif self._kquant and x.device.type == "cpu" and self.weight_blocks.device.type == "cpu":
            y = kernels.kquant_linear(x, self.fmt, self.weight_blocks, self.out_features)
        else:
            with LAYOUT_LOCK:  # switch at most once, and read the pair that results
                on_cpu = self.weight_blocks.device.type == "cpu"
                if on_cpu and self.layout == "ggml" and self.repack:
                    layout = kernels.cpu_layout(self.fmt, self.out_features)
                    if layout != "ggml":
                        self._set_layout(layout)
                elif not on_cpu and self.layout != "ggml":  # on a GPU: Triton reads GGML rows
                    self._set_layout("ggml")
                blocks, layout = self.weight_blocks, self.layout
            y = kernels.quant_linear(x, self.fmt, blocks, self.out_features, layout)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y


class QuantEmbedding(nn.Module):
    """Token embeddings in GGML blocks: a lookup dequantizes just the rows it gathers.
    Tied to the LM head when the model ties them (the head is a QuantLinear on the same
    blocks)."""

    def __init__(self, weight: QuantTensor, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fmt = weight.fmt
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = dtype
        self.register_buffer("weight_blocks", weight.data, persistent=True)
        self.layout = "ggml"  # "x8" or "tq2_x8" when a tied head repacked the shared blocks

    @property
    def weight(self) -> QuantTensor:
        return ggml_weight(self, (self.num_embeddings, self.embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        with LAYOUT_LOCK:  # a tied head may be swapping the shared blocks right now
            blocks, layout = self.weight_blocks, self.layout
        if layout in ("x8", kernels.TQ2_TILES):
            # gather each id's group of 8 rows, turn those groups back into rows
            groups = blocks.view(self.num_embeddings // 8, -1)[flat // 8]
            rows = kernels.untile(self.fmt, groups.view(-1, blocks.shape[1]),
                                  self.embedding_dim, layout)  # fmt: skip
            rows = rows.view(len(flat), 8, -1)[torch.arange(len(flat)), flat % 8]
        else:
            rows = F.embedding(flat, blocks)  # gathers whole block rows
        fmt = kernels.layout_format(self.fmt, layout)  # a tied TQ1_0 head holds TQ2_0 rows
        out = kernels.dequantize(fmt, rows.contiguous(), self.embedding_dim)
        return out.to(self.dtype).view(*ids.shape, self.embedding_dim)


def ggml_weight(module: nn.Module, shape: tuple[int, int]) -> QuantTensor:
    """A quantized module's weight as GGML blocks, whatever layout it holds now."""
    with LAYOUT_LOCK:
        blocks, layout = module.weight_blocks, module.layout
    if layout != "ggml":
        blocks = kernels.relayout(module.fmt, blocks.cpu(), shape[1], layout, "ggml")
    return QuantTensor(module.fmt, blocks, shape)


def release_pages(t: torch.Tensor) -> None:
    """Drop a file-mapped tensor's pages from this process (madvise MADV_DONTNEED): its
    data stays in the file and the OS cache, and would fault back in if read again, so
    this is only a hint about memory, never about contents. Pages shared with a
    neighbouring tensor are kept. Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    stop = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if stop > start:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), 4)  # MADV_DONTNEED


def install(model: nn.Module, name: str, value: QuantTensor | torch.Tensor) -> None:
    """Set the HF-named parameter `name` of a model (e.g. built on the meta device).

    A QuantTensor for a `*.weight` of a Linear or Embedding swaps in a QuantLinear /
    QuantEmbedding (keeping the Linear's bias, which may be set before or after); a
    float tensor is set as a plain parameter. A tied LM head follows its embedding.
    """
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(value, QuantTensor):
        if attr != "weight":
            raise QuantError(f"{name}: only weights can be quantized")
        if isinstance(module, nn.Embedding | QuantEmbedding):
            dtype = getattr(model, "compute_dtype", torch.float32)
            new: nn.Module = QuantEmbedding(value, dtype)
        else:
            new = QuantLinear(value, getattr(module, "bias", None))
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        if name == f"{getattr(model, 'embeddings_name', None)}.weight" and getattr(
            getattr(model, "config", None), "tie_word_embeddings", False
        ):
            model.lm_head = QuantLinear(value)
            model.lm_head.shared.append(new)  # the embedding reads the head's blocks
        return
    if isinstance(module, TernaryLinear) and attr == "weight" and value.is_floating_point():
        module.load_float(value)  # the unquantized revision of a ternary checkpoint
        return
    setattr(module, attr, nn.Parameter(value, requires_grad=False))
