"""LoRA adapters in PEFT's folder format, written and read.

A PEFT LoRA folder holds `adapter_config.json` (peft_type "LORA", r, lora_alpha,
target_modules, ...) and `adapter_model.safetensors` with two tensors per adapted layer,

    base_model.model.<HF module name>.lora_A.weight   (r, in_features)
    base_model.model.<HF module name>.lora_B.weight   (out_features, r)

and the layer computes y = x W^T + scaling * x A^T B^T with scaling = lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora). Rows of B are in the HF checkpoint's row order;
a model whose layout reorders a weight's rows at load (Falcon's fused QKV,
`CheckpointLayout.transforms`) reorders B's rows the same way: `to_model_rows` and
`to_hf_rows` do it for any row-permuting transform.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from falconet.durable import atomic_write, atomic_write_text, publish_folder
from falconet.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class AdapterError(CheckpointError):
    """A LoRA adapter folder falconet cannot read (missing file, unsupported option)."""


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


# ---- the folder -------------------------------------------------------------------------
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
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.detach().contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.detach().contiguous()
    with publish_folder(Path(folder)) as tmp:
        atomic_write(
            tmp / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"})
        )
        atomic_write_text(tmp / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
        if model_card:
            atomic_write_text(tmp / "README.md", model_card)


def read_peft_adapter(
    folder: str | Path,
) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """A PEFT LoRA folder -> (adapter_config, {HF module name: (A, B)}, scaling).

    A is (r, in_features), B (out_features, r), in the HF checkpoint's row order (see
    `to_model_rows`); the layer adds scaling * x A^T B^T. Options that change what a layer
    computes beyond that (DoRA, per-layer rank or alpha patterns, fan_in_fan_out, trained
    biases) are refused with an AdapterError rather than applied wrongly.
    """
    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterError(f"{folder}: no {path.name}; is this a PEFT LoRA adapter folder?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterError(f'{config_path}: peft_type must be "LORA"')
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or rank <= 0 or not isinstance(alpha, int | float):
        raise AdapterError(f"{config_path}: r must be a positive integer and lora_alpha a number")
    unsupported = [
        ("use_dora", bool(config.get("use_dora"))),
        ("rank_pattern", bool(config.get("rank_pattern"))),
        ("alpha_pattern", bool(config.get("alpha_pattern"))),
        ("fan_in_fan_out", bool(config.get("fan_in_fan_out"))),
        ("bias", config.get("bias", "none") != "none"),
    ]
    for key, used in unsupported:
        if used:
            raise AdapterError(f"{config_path}: {key} = {config[key]!r} is not supported")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{weights_path}: not a readable safetensors file ({e})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        stem = name.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            if stem.endswith(f".{part}.weight"):
                pairs.setdefault(stem[: -len(f".{part}.weight")], {})[part] = t
                break
        else:
            raise AdapterError(f"{weights_path}: tensor {name} is not a LoRA A or B weight")
    weights = {}
    for module, ab in sorted(pairs.items()):
        a, b = ab.get("lora_A"), ab.get("lora_B")
        if a is None or b is None:
            raise AdapterError(f"{weights_path}: {module} has lora_A or lora_B but not both")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(
                f"{weights_path}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                f"not (r, in) and (out, r) with r = {rank}"
            )
        weights[module] = (a, b)
    if not weights:
        raise AdapterError(f"{weights_path}: holds no LoRA weights")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return config, weights, float(scaling)
