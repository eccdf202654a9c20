"""Per-sequence LoRA: several adapters over one base model, in one packed forward.

A LoRA adapter (Hu et al., 2021) adds to a frozen Linear layer W a low-rank update:

    y = W x + b + scaling * B (A x)        A (r, in), B (out, r), scaling = alpha / r

(alpha / sqrt(r) with rsLoRA). `LoRALayers` keeps the adapters a model serves and hooks
each targeted layer (a float `Linear`, a `QuantLinear` or a `TernaryLinear` alike: the
hook sees only the layer's input and output), so the model files stay as they are.

Which rows get which adapter is the step's business, not the model's: the engine's
runner packs the new tokens of many sequences into one row, and inside
`with adapter_rows(rows):` (per thread, like `batch_invariant()`) each targeted layer
adds, for each adapter in the step, its update to that adapter's rows only; rows of
sequences without an adapter get nothing. Outside such a block the hooks do nothing
(the base model).

How. On a CPU with falconet's compiled kernels, one call per layer
(`native.lora_rows`, kernels_lora.h) takes every row that has an adapter, each through
its own adapter only (rows of one adapter in tiles that load each weight once for a few
rows), and adds the update to the layer's output in place: no fp32 copy of the input or
output, and a decode step's handful of rows per adapter costs no per-adapter calls.
Elsewhere (no compiler, CUDA) two PyTorch ways, by the kind of row:

- Decode rows (a sequence's next token, or a speculative verify) are few per adapter, so
  per-adapter calls would cost more in call overhead than in arithmetic (0.44x of the
  base at 4 adapters, docs/benchmarks.md). They take the grouped update: a layer's
  adapters stacked side by side, A_all (sum of ranks, in) and B_all (out, sum of
  ranks); the step's decode rows that have an adapter go through A_all in one call, each
  row's columns are weighted by its adapter's scaling and the other adapters' zeroed
  (a mask), then through B_all in one call: two small GEMMs per layer whatever the
  number of adapters.
- Prompt rows (prefill) come by the hundred per adapter, where the grouped update's
  extra arithmetic (every row through every adapter's A and B) is what costs: each
  adapter runs its own A and B on its own prompt rows.

Bit-exact batching. Every row's update is computed in fp32 with a fixed order of its own
(the kernel's per-row sums; falconet `Linear`s inside `batch_invariant()`, which give each
row the same bits whatever rows share the call), so a sequence's output does not depend
on which other sequences, with which adapters, share its step. In the grouped update the
masked columns are exact zeros, so a row's B sum is the same whichever other adapters'
rows share the step, and which way a row goes depends only on its own sequence (prompt
or decode), never on the step. The update is added after the base layer's output (bias
included) and in fp32 -- as PEFT computes it, then rounded once to the output's dtype --
whatever the base weight's storage: on a quantized base it corrects the dequantized
product, it is never quantized itself.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from falconet.errors import AdapterError
from falconet.nn.linear import Linear, native


@dataclass(frozen=True)
class LoRA:
    """One layer's update: `scaling * B(A(x))`, A and B fp32 `Linear`s without bias."""

    A: Linear  # in -> r
    B: Linear  # r -> out
    scaling: float

    @classmethod
    def from_tensors(
        cls, a: torch.Tensor, b: torch.Tensor, scaling: float, device: torch.device | None = None
    ) -> LoRA:
        r, n_in = a.shape
        n_out = b.shape[0]
        A = Linear(n_in, r, bias=False, dtype=torch.float32, device=device)
        B = Linear(r, n_out, bias=False, dtype=torch.float32, device=device)
        A.weight.data.copy_(a)
        B.weight.data.copy_(b)
        return cls(A, B, float(scaling))

    def merged(self) -> torch.Tensor:
        """scaling * B @ A (out, in), fp32: the update as a weight matrix."""
        return (self.B.weight @ self.A.weight) * self.scaling


@dataclass(frozen=True)
class Stack:
    """One layer's adapters side by side (see the module docstring)."""

    A: Linear  # in -> sum of ranks
    B: Linear  # sum of ranks -> out
    columns: tuple[tuple[int, int, int, float], ...]  # (adapter index, start, stop, scaling)
    Bt: torch.Tensor  # B's weight transposed (sum of ranks, out), for the compiled kernel
    pointers: tuple[int, int, int]  # (A's address, Bt's address, out features): the kernel's

    @property
    def adapters(self) -> dict[int, tuple[int, int, float]]:
        """adapter index -> (first rank column, end column, scaling)."""
        return {i: (start, stop, scaling) for i, start, stop, scaling in self.columns}

    @classmethod
    def of(cls, loras: dict[int, LoRA]) -> Stack:
        order = sorted(loras)
        columns, at = [], 0
        for i in order:
            r = loras[i].A.out_features
            columns.append((i, at, at + r, loras[i].scaling))
            at += r
        a = torch.cat([loras[i].A.weight.data for i in order])
        b = torch.cat([loras[i].B.weight.data for i in order], dim=1)
        both = LoRA.from_tensors(a, b, 1.0, a.device)
        Bt = both.B.weight.data.t().contiguous()
        pointers = (both.A.weight.data_ptr(), Bt.data_ptr(), Bt.shape[1])
        return cls(both.A, both.B, tuple(columns), Bt, pointers)


@dataclass(frozen=True)
class AdapterRows:
    """Which packed rows of a step each adapter updates, (adapter index, row indices in
    ascending order): decode rows (`groups`, the grouped update) and prompt rows
    (`prompts`, each adapter's own)."""

    groups: tuple[tuple[int, torch.Tensor], ...]
    total: int  # rows in the step (the packed tokens)
    prompts: tuple[tuple[int, torch.Tensor], ...] = ()
    # per column layout of a Stack, made once per step: `plan`'s (rows, weights), and
    # under ("kernel", layout) `kernel_plan`'s arguments with the tensors they point into
    _plans: dict = field(default_factory=dict, compare=False, repr=False)

    def at(self, rows: torch.Tensor) -> torch.Tensor | None:
        """`rows` to gather and put back, or None when they are every row of the step
        (distinct rows: then they are 0..total-1, in order)."""
        return None if len(rows) == self.total else rows

    def plan(self, stack: Stack) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """For the layer's stack: the rows to update (R,) in ascending order, or None when
        they are all the step's rows (nothing to gather or scatter); and the column
        weights (R, sum of ranks): each row's scaling on its own adapter's columns, 0 on
        the others'. None when no row of the step has one of the stack's adapters."""
        if stack.columns in self._plans:
            return self._plans[stack.columns]
        mine = stack.adapters
        parts = [(rows, *mine[i]) for i, rows in self.groups if i in mine]
        plan = None
        if parts:
            rows = torch.cat([p[0] for p in parts])
            width = stack.columns[-1][2]
            weights = torch.zeros(len(rows), width, device=rows.device)
            at = 0
            for r, start, stop, scaling in parts:
                weights[at : at + len(r), start:stop] = scaling
                at += len(r)
            rows, order = rows.sort()
            plan = (self.at(rows), weights[order])
        self._plans[stack.columns] = plan
        return plan

    def kernel_plan(self, stack: Stack) -> tuple[int, ...] | None:
        """The compiled kernel's arguments for the layer's stack: the number R of rows with
        one of its adapters (decode and prompt rows alike), the addresses of per row its
        adapter's first rank column (int32), rank (int32) and scaling (fp32) and of the
        rows (int64, grouped by adapter, ascending within), and the thread count; None
        when no row has one of the stack's adapters."""
        key = ("kernel", stack.columns)
        if key in self._plans:
            return self._plans[key][0]
        mine = stack.adapters
        by_adapter: dict[int, list[torch.Tensor]] = {}
        for i, r in (*self.groups, *self.prompts):
            if i in mine:
                by_adapter.setdefault(i, []).append(r)
        plan, tensors = None, ()
        if by_adapter:
            rows, starts, ranks, scales = [], [], [], []
            for i, parts in sorted(by_adapter.items()):
                r = torch.cat(parts).sort().values
                start, stop, scaling = mine[i]
                rows.append(r)
                starts += [start] * len(r)
                ranks += [stop - start] * len(r)
                scales += [scaling] * len(r)
            tensors = (
                torch.cat(rows),
                torch.tensor(starts, dtype=torch.int32),
                torch.tensor(ranks, dtype=torch.int32),
                torch.tensor(scales, dtype=torch.float32),
            )
            at, starts_t, ranks_t, scales_t = tensors
            plan = (
                len(at), starts_t.data_ptr(), ranks_t.data_ptr(), scales_t.data_ptr(),
                at.data_ptr(), torch.get_num_threads(),
            )  # fmt: skip
        self._plans[key] = (plan, tensors)  # the tensors stay alive as long as the step
        return plan


_state = threading.local()


@contextlib.contextmanager
def adapter_rows(rows: AdapterRows | None) -> Iterator[None]:
    """Within the block, on this thread, hooked layers add each adapter's update to its rows."""
    before = getattr(_state, "rows", None)
    _state.rows = rows
    try:
        yield
    finally:
        _state.rows = before


class LoRALayers:
    """The LoRA adapters served over one model, by name; each adapter's layers are hooked
    into the model's modules of the same name (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names: list[str] = []
        self._layers: dict[str, dict[int, LoRA]] = {}  # module name -> adapter index -> LoRA
        self._stacks: dict[str, Stack] = {}  # module name -> its adapters side by side
        self._wrapped: dict[str, nn.Module] = {}  # module name -> the module, wrapped

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise AdapterError(
                f"no adapter named {name!r} is loaded (loaded: {', '.join(self.names) or 'none'})"
            ) from None

    def add(self, name: str, layers: dict[str, LoRA]) -> None:
        """Serve adapter `name`: module name -> its layer's update."""
        if name in self.names:
            raise AdapterError(f"an adapter named {name!r} is loaded already")
        if not layers:
            raise AdapterError(f"adapter {name!r} updates no layer")
        modules = dict(self.model.named_modules())
        for module_name in layers:
            if module_name not in modules:
                raise AdapterError(f"adapter {name!r}: the model has no module {module_name}")
        index = len(self.names)
        self.names.append(name)
        for module_name, lora in layers.items():
            self._layers.setdefault(module_name, {})[index] = lora
            self._stacks[module_name] = Stack.of(self._layers[module_name])
            if module_name not in self._wrapped:
                self._wrap(module_name, modules[module_name])

    def _wrap(self, module_name: str, module: nn.Module) -> None:
        """The module's forward, then the step's updates. An instance attribute, not a
        forward hook: a module with hooks takes nn.Module's slow call path, which cost as
        much as the updates themselves at decode (48 layers a step)."""
        inner = module.forward
        apply = self._apply

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            return apply(module_name, x, inner(x, *args, **kwargs))

        module.forward = forward
        self._wrapped[module_name] = module

    def close(self) -> None:
        """Unwrap every layer: the model computes the base model again."""
        for module in self._wrapped.values():
            del module.forward  # the class's forward again
        self._wrapped.clear()
        self._layers.clear()
        self._stacks.clear()
        self.names.clear()

    def rows(self, adapters: Sequence[tuple[str | None, int, bool]]) -> AdapterRows | None:
        """The step's rows per adapter, from each packed part's (adapter name or None,
        token count, whether they are prompt tokens) in packing order; None when no part
        has an adapter."""
        decode: dict[int, list[int]] = {}
        prompts: dict[int, list[int]] = {}
        at = 0
        for name, n, prompt in adapters:
            if name is not None:
                (prompts if prompt else decode).setdefault(self.index(name), []).extend(
                    range(at, at + n)
                )
            at += n
        if not decode and not prompts:
            return None
        device = next(iter(self.model.parameters())).device

        def tensors(groups: dict[int, list[int]]) -> tuple[tuple[int, torch.Tensor], ...]:
            return tuple(
                (i, torch.tensor(r, dtype=torch.long, device=device)) for i, r in groups.items()
            )

        return AdapterRows(tensors(decode), at, tensors(prompts))

    def _apply(self, module_name: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """`output` of the layer `module_name` on input `x`, with the step's updates."""
        rows: AdapterRows | None = getattr(_state, "rows", None)
        if rows is None:
            return output
        x = x.reshape(-1, x.shape[-1])  # (M, in)
        if x.shape[0] != rows.total:  # a layer run on other rows than the step's tokens
            raise AdapterError(
                f"{module_name} ran on {x.shape[0]} rows, not the step's {rows.total} "
                "tokens; LoRA cannot target this layer"
            )
        stack = self._stacks.get(module_name)
        if (
            stack is not None
            and native is not None
            and (x.dtype, output.dtype, x.device.type) in _KERNEL_TAKES
        ):
            if (kplan := rows.kernel_plan(stack)) is None:
                return output
            # (a view, e.g. a slice of a fused projection, is copied: which way a row
            # goes must not depend on the step, only on the model)
            y = output if output.is_contiguous() else output.contiguous()
            kernel_update(stack, x if x.is_contiguous() else x.contiguous(), y, kplan)
            return y
        updates = []  # (rows or None for all, the update of those rows (R, out) fp32)
        if stack is not None and (plan := rows.plan(stack)) is not None:
            at, weights = plan
            xs = x.float() if at is None else x.index_select(0, at).float()
            # scaling on the rank columns (B is linear): r multiplies per row, not `out`
            updates.append((at, stack.B(stack.A(xs).mul_(weights))))
        layers = self._layers.get(module_name, {})
        for i, prompt_rows in rows.prompts:
            if (lora := layers.get(i)) is not None:
                at = rows.at(prompt_rows)
                xs = x.float() if at is None else x.index_select(0, at).float()
                updates.append((at, lora.B(lora.A(xs).mul_(lora.scaling))))
        if not updates:
            return output
        # fp32, as PEFT adds the update, then back to the output's dtype; an fp32 output
        # (the layer's own fresh tensor) takes the update in place, without a copy. Rows
        # are distinct, so gather-add-put adds once per element as index_add_ would, at
        # a fraction of its cost (its CPU scatter took 2/3 of a 16-row decode step).
        y = output.reshape(-1, output.shape[-1]).float()  # (M, out)
        for at, delta in updates:
            if at is None:
                y.add_(delta)
            else:
                y.index_copy_(0, at, y.index_select(0, at).add_(delta))
        return y.to(output.dtype).view(output.shape)


def kernel_update(stack: Stack, x: torch.Tensor, y: torch.Tensor, plan: tuple[int, ...]) -> None:
    """The compiled kernel: each row of `plan` (`AdapterRows.kernel_plan`) gets its own
    adapter's update, added to y (M, out) in place; x (M, in); both contiguous."""
    a_ptr, bt_ptr, n_out = stack.pointers
    native.lora_rows(
        x.data_ptr(), x.dtype == torch.bfloat16, plan[0], x.shape[-1], a_ptr, bt_ptr, n_out,
        *plan[1:5], y.data_ptr(), y.dtype == torch.bfloat16, plan[5],
    )  # fmt: skip


# (input dtype, output dtype, device) the compiled kernel (kernels_lora.h) updates: CPU
# fp32/bf16 layers -- a property of the model, never of the step
_KERNEL_TAKES = frozenset(
    (x, y, "cpu") for x in (torch.float32, torch.bfloat16) for y in (torch.float32, torch.bfloat16)
)


def merge(model: nn.Module, layers: dict[str, LoRA]) -> None:
    """Fold the updates into float `Linear` weights (W + scaling * B @ A, rounded to the
    weight's dtype once): the adapter at no cost per token. Every layer must be a float
    `Linear`; a quantized one keeps its update apart (`LoRALayers`)."""
    for name in layers:
        module = model.get_submodule(name)
        if not isinstance(module, Linear):
            raise AdapterError(f"{name} is {type(module).__name__}; only float weights merge")
    for name, lora in layers.items():
        w = model.get_submodule(name).weight
        w.data.copy_((w.float() + lora.merged()).to(w.dtype))
