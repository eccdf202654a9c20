"""Which classes run a checkpoint, from what the checkpoint says it is.

An HF config.json names its architecture by `model_type` (and `architectures`); a GGUF
file by `general.architecture`. Each maps to one `Architecture`: the model class, its
config class and its checkpoint tensor table. Never a file or model name: Falcon3 is
found by `model_type: llama`, not by "Falcon3" in a path.

| architecture | HF model_type                       | HF architectures    | GGUF     |
|--------------|-------------------------------------|---------------------|----------|
| falcon       | falcon, RefinedWeb, RefinedWebModel | FalconForCausalLM   | falcon   |
| llama        | llama                               | LlamaForCausalLM    | llama    |
| falcon_mamba | falcon_mamba                        | FalconMambaForCausalLM | mamba    |
| falcon_h1    | falcon_h1                           | FalconH1ForCausalLM | falcon-h1 |
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from falconet.errors import ConfigError
from falconet.models.base import CausalLM, CheckpointLayout
from falconet.models.falcon import Falcon
from falconet.models.falcon_config import FALCON_MODEL_TYPES, FalconConfig, read_config_json
from falconet.models.falcon_h1 import FalconH1
from falconet.models.falcon_h1_config import FALCON_H1_MODEL_TYPES, FalconH1Config
from falconet.models.falcon_mamba import FalconMamba
from falconet.models.falcon_mamba_config import FALCON_MAMBA_MODEL_TYPES, FalconMambaConfig
from falconet.models.llama import Llama
from falconet.models.llama_config import LLAMA_MODEL_TYPES, LlamaConfig

ModelConfig = FalconConfig | LlamaConfig | FalconMambaConfig | FalconH1Config


@dataclass(frozen=True)
class Architecture:
    name: str
    model: type[CausalLM]
    config: type[ModelConfig]
    hf_model_types: tuple[str, ...]
    hf_architectures: tuple[str, ...]
    gguf_architecture: str  # llama.cpp's general.architecture

    def shapes(
        self, config: ModelConfig, dtype: torch.dtype, compute_dtype: torch.dtype | None = None
    ) -> CausalLM:
        """The model for `config` with parameters that are shapes only (device "meta"):
        what a loader fills from a checkpoint, each tensor allocated as it is read."""
        with torch.device("meta"), _initializers_skipped():
            return self.model(config, dtype, compute_dtype)

    def layout(self, config: ModelConfig) -> CheckpointLayout:
        """The HF checkpoint's tensor table for `config` (the model file's), with what
        the loaders need to know around it: a tied head is not loaded, and which tensor
        is the output head."""
        tensors = self.model.checkpoint_layout(config)
        embeddings = f"{self.model.embeddings_name}.weight"
        tied = config.tie_word_embeddings
        return replace(
            tensors,
            skipped=frozenset({"lm_head.weight"} if tied else ()),
            heads=frozenset({embeddings if tied else "lm_head.weight"}),
            name=self.name,
            description=f"{config.variant}, {config.num_hidden_layers} layers",
        )


ARCHITECTURES = (
    Architecture(
        "falcon", Falcon, FalconConfig, FALCON_MODEL_TYPES, ("FalconForCausalLM",), "falcon"
    ),
    Architecture("llama", Llama, LlamaConfig, LLAMA_MODEL_TYPES, ("LlamaForCausalLM",), "llama"),
    Architecture(
        "falcon_mamba",
        FalconMamba,
        FalconMambaConfig,
        FALCON_MAMBA_MODEL_TYPES,
        ("FalconMambaForCausalLM",),
        "mamba",
    ),
    Architecture(
        "falcon_h1",
        FalconH1,
        FalconH1Config,
        FALCON_H1_MODEL_TYPES,
        ("FalconH1ForCausalLM",),
        "falcon-h1",
    ),
)


_INIT_LOCK = threading.Lock()
_init_depth = 0
_init_saved: dict[str, Any] = {}


@contextmanager
def _initializers_skipped() -> Iterator[None]:
    """torch.nn.init's in-place initializers skip meta tensors while models are built (as
    transformers' `no_init_weights` skips them). Why: on the meta device torch runs e.g.
    `normal_` through a Python decomposition whose wrapper imports torch._dynamo -- about
    140 MiB resident and a second of import in a process that never compiles anything,
    paid again by every tensor-parallel rank. The stand-ins call the real function for
    any other tensor, and a depth count under a lock lets loads overlap across threads
    (the first in patches, the last out restores)."""
    global _init_depth
    init = torch.nn.init
    with _INIT_LOCK:
        if _init_depth == 0:
            names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_")]
            _init_saved.update({n: getattr(init, n) for n in names if callable(getattr(init, n))})
            for name, fn in _init_saved.items():
                setattr(init, name, _skipping_meta(fn))
        _init_depth += 1
    try:
        yield
    finally:
        with _INIT_LOCK:
            _init_depth -= 1
            if _init_depth == 0:
                for name, fn in _init_saved.items():
                    setattr(init, name, fn)
                _init_saved.clear()


def _skipping_meta(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def initializer(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor
        return fn(tensor, *args, **kwargs)

    return initializer


def _supported() -> str:
    return ", ".join(t for a in ARCHITECTURES for t in a.hf_model_types)


def for_hf(hf: dict[str, Any]) -> Architecture:
    """The architecture of a config.json dict: by `model_type`, or by `architectures`
    when a config has no model_type. ConfigError when falconet has none for it."""
    if not isinstance(hf, dict):
        raise ConfigError(f"config: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    for arch in ARCHITECTURES:
        if model_type in arch.hf_model_types:
            return arch
    if model_type is None:
        named = hf.get("architectures") or []
        for arch in ARCHITECTURES:
            if isinstance(named, list) and set(named) & set(arch.hf_architectures):
                return arch
    raise ConfigError(
        f"config: model_type {model_type!r} is not a Falcon model falconet runs "
        f"(model types {_supported()}; Falcon3 is llama)"
    )


def for_config(config: ModelConfig) -> Architecture:
    for arch in ARCHITECTURES:
        if type(config) is arch.config:
            return arch
    raise TypeError(f"no architecture uses config class {type(config).__name__}")


def for_gguf(name: str) -> Architecture | None:
    """The architecture llama.cpp calls `name`, or None."""
    return next((a for a in ARCHITECTURES if a.gguf_architecture == name), None)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A config.json dict as the config class its architecture uses."""
    arch = for_hf(hf)
    if hf.get("model_type") is None:  # found by `architectures`
        hf = {**hf, "model_type": arch.hf_model_types[0]}
    return arch.config.from_hf(hf)


def read_hf_config(path: Path) -> ModelConfig:
    """Read config.json at `path`; ConfigError naming the file and the problem."""
    data = read_config_json(path)
    try:
        return config_from_hf(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
