"""PEFT LoRA adapter folders: read, check against a base model, turn into `LoRA` layers.

An adapter folder, as `peft`'s `save_pretrained` writes it (and `falconet finetune
--lora`):

- `adapter_config.json`: `peft_type` "LORA", `r`, `lora_alpha`, `target_modules`,
  `use_rslora` (scaling alpha / sqrt(r) instead of alpha / r), `rank_pattern` and
  `alpha_pattern` (per-module r and alpha), `fan_in_fan_out`, `bias`, `use_dora`,
  `modules_to_save`, ...;
- `adapter_model.safetensors`: `base_model.model.<HF module path>.lora_A.weight` (r, in)
  and `.lora_B.weight` (out, r) for every targeted module. A pickled
  `adapter_model.bin` is refused: loading it would run code from the folder.

`read_peft_adapter(folder)` reads and checks the folder alone; `adapter_layers(adapter,
model)` checks it against the base and gives falconet's layers; `write_peft_adapter`
publishes one (`falconet finetune --save-adapter`). falconet's module names
are the HF checkpoint's (models/checkpoint.py loads every tensor by its HF name), so an
HF module path names a falconet module; a tensor the checkpoint layout transforms on
load (Falcon's fused QKV rows, `regroup_qkv`) has B's rows -- the layer's output
features -- transformed alike.

Refused, each with a one-line `AdapterError`: another PEFT method, DoRA, LoRA biases,
`bias` other than "none", `modules_to_save` (whole replaced layers), embedding LoRA,
the output head, a module the base lacks or whose shapes differ.
`fan_in_fan_out` is ignored as PEFT ignores it for torch Linear layers (it resets it,
with a warning: the tensors are stored (r, in) and (out, r) either way).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from falconet.durable import atomic_write, atomic_write_text, publish_folder
from falconet.errors import AdapterError
from falconet.models.registry import for_config
from falconet.nn.lora import LoRA

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
# lora_A / lora_B, with or without an adapter name (PEFT leaves out "default" when saving)
KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoRAModule:
    """One targeted module of an adapter: A (r, in), B (out, r) in fp32 and its scaling."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float


@dataclass(frozen=True)
class PeftAdapter:
    folder: Path
    config: dict[str, Any]  # adapter_config.json as read
    modules: dict[str, LoRAModule]  # HF module path -> its update

    @property
    def base_model(self) -> str | None:
        """The base the adapter was trained on, as its config names it (informational)."""
        return self.config.get("base_model_name_or_path")


def read_peft_adapter(folder: str | Path) -> PeftAdapter:
    """Read and check a PEFT LoRA adapter folder; AdapterError names the problem."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AdapterError(
            f"{folder}: not a folder; give a PEFT adapter folder ({CONFIG_FILE} + {WEIGHTS_FILE})"
        )
    config = _read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        if (folder / PICKLED_FILE).is_file():
            raise AdapterError(
                f"{folder}: only {PICKLED_FILE} (a pickle, which falconet never loads); "
                f"save the adapter with safe_serialization=True to get {WEIGHTS_FILE}"
            )
        raise AdapterError(f"{folder}: no {WEIGHTS_FILE}; is this a PEFT adapter folder?")
    tensors = _read_tensors(weights)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterError(
                f"{weights}: tensor {key} is not under {PREFIX!r}; not a PEFT LoRA adapter"
            )
        name = key.removeprefix(PREFIX)
        m = KEY.match(name)
        if m is None:
            raise AdapterError(f"{weights}: tensor {key} is no LoRA A/B matrix ({_what(name)})")
        pairs.setdefault(m["module"], {})[m["part"]] = value
    if not pairs:
        raise AdapterError(f"{weights}: holds no LoRA tensors")
    modules = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise AdapterError(f"{weights}: {module} has no {missing} tensor")
        modules[module] = _module(weights, module, ab["A"], ab["B"], config)
    return PeftAdapter(folder, config, modules)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{folder}: no {CONFIG_FILE}; is this a PEFT adapter folder?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise AdapterError(f"{path}: cannot be read ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise AdapterError(
            f"{path}: peft_type {kind!r} is not supported; falconet runs LoRA adapters"
        )
    unsupported = {
        "use_dora": "DoRA adapters",
        "lora_bias": "LoRA biases (lora_bias)",
        "modules_to_save": "modules_to_save (whole layers replaced)",
        "target_parameters": "target_parameters",
        "trainable_token_indices": "trainable_token_indices",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise AdapterError(f"{path}: {what} are not supported; use a plain LoRA adapter")
    if config.get("bias", "none") != "none":
        raise AdapterError(
            f"{path}: bias {config['bias']!r} is not supported (trained biases); use bias 'none'"
        )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not _positive_int(r):
        raise AdapterError(f"{path}: 'r' must be an int >= 1, got {r!r}")
    if not _number(alpha):
        raise AdapterError(f"{path}: 'lora_alpha' must be a number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict) or not all(
            (_positive_int if key == "rank_pattern" else _number)(v) for v in value.values()
        ):
            raise AdapterError(f"{path}: {key!r} must map module patterns to numbers")
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            # safe_open has no __iter__: keys() it is
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from None


def _what(name: str) -> str:
    if "lora_embedding" in name:
        return "embedding LoRA is not supported"
    if "lora_magnitude" in name:
        return "DoRA is not supported"
    if "modules_to_save" in name:
        return "modules_to_save is not supported"
    return "only lora_A / lora_B weights are supported"


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: the first pattern matching the module path's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module(path: Path, module: str, a: torch.Tensor, b: torch.Tensor, config: dict) -> LoRAModule:
    r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    for t, part in ((a, "lora_A"), (b, "lora_B")):
        if t.ndim != 2 or not t.is_floating_point():
            raise AdapterError(
                f"{path}: {module}.{part} is {t.dtype} {tuple(t.shape)}; expected a 2-D float "
                "matrix (a LoRA of a Linear layer)"
            )
    if a.shape[0] != r or b.shape[1] != r:
        raise AdapterError(
            f"{path}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
            f"rank {r} from {CONFIG_FILE} needs lora_A (r, in) and lora_B (out, r)"
        )
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return LoRAModule(a.float(), b.float(), float(scaling))


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def adapter_layers(adapter: PeftAdapter, model: nn.Module) -> dict[str, LoRA]:
    """falconet module name -> `LoRA` for each module the adapter targets, checked against
    the base `model` (a falconet CausalLM): the module exists and is a linear layer (not the
    output head), and A and B fit its shape."""
    config = model.config
    layout = for_config(config).layout(config)
    device = next(iter(model.parameters())).device
    modules = dict(model.named_modules())
    layers = {}
    for name, m in adapter.modules.items():
        weight = f"{name}.weight"
        where = f"{adapter.folder}: targets {name}"
        if weight in layout.heads or name == "lm_head":
            raise AdapterError(f"{where}, the output head; LoRA on the head is not supported")
        module = modules.get(name)
        shape = layout.shapes.get(weight)
        if module is None or shape is None or len(shape) != 2:
            raise AdapterError(
                f"{where}, which a {for_config(config).name} base has no linear layer of; "
                "was the adapter trained on another architecture?"
            )
        out_features, in_features = shape
        if m.A.shape[1] != in_features or m.B.shape[0] != out_features:
            raise AdapterError(
                f"{where} with lora_A {tuple(m.A.shape)} and lora_B {tuple(m.B.shape)}, but "
                f"the base layer is ({out_features}, {in_features}); was the adapter trained "
                "on another model size?"
            )
        b = m.B
        if weight in layout.transforms:  # the layer's output rows are reordered on load
            b = layout.transforms[weight](b)
        layers[name] = LoRA.from_tensors(m.A, b, m.scaling, device)
    return layers


# ---- rows between the HF checkpoint and the model ---------------------------------------
def row_permutation(transform: Callable[[torch.Tensor], torch.Tensor], rows: int) -> torch.Tensor:
    """perm (rows,) with model row i = HF row perm[i], read off the transform itself;
    ValueError if the transform does more than reorder rows."""
    probe = torch.arange(rows, dtype=torch.float64)[:, None]
    perm = transform(probe)[:, 0].round().long()
    if perm.shape != (rows,) or not torch.equal(perm.sort().values, torch.arange(rows)):
        raise ValueError("the checkpoint transform is not a reordering of rows")
    return perm


def to_model_rows(t: torch.Tensor, transform: Callable | None) -> torch.Tensor:
    """An HF-ordered (out, ...) tensor in the model's row order."""
    return t if transform is None else t[row_permutation(transform, t.shape[0])]


def to_hf_rows(t: torch.Tensor, transform: Callable | None) -> torch.Tensor:
    """A model-ordered (out, ...) tensor in the HF checkpoint's row order."""
    if transform is None:
        return t
    out = torch.empty_like(t)
    out[row_permutation(transform, t.shape[0])] = t
    return out


# ---- writing -----------------------------------------------------------------------------
def write_peft_adapter(
    folder: Path,
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    alpha: float,
    dropout: float,
    base_model: str,
    model_card: str | None = None,
) -> None:
    """Publish {HF module name: (A, B)} (HF row order) as a PEFT LoRA folder, atomically."""
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(weights),  # whole names: PEFT matches them exactly
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = {}
    for module, (a, b) in weights.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.detach().contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.detach().contiguous()
    with publish_folder(Path(folder)) as tmp:
        atomic_write(
            tmp / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"})
        )
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        if model_card:
            atomic_write_text(tmp / "README.md", model_card)
