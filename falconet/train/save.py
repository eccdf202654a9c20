"""Write a Hugging Face Falcon folder that transformers and falconet both load.

config.json, model.safetensors (HF tensor names, the fused QKV in its HF layout, the
tied head left out as transformers does), tokenizer.json, tokenizer_config.json,
generation_config.json and an optional model card. The folder is published atomically.
`save_like` writes any registered architecture in the shape of the folder it came from
(fine-tuning's output).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from falconet.durable import atomic_write, atomic_write_bytes, atomic_write_text, publish_folder
from falconet.models.adapters import to_hf_rows
from falconet.models.base import CausalLM
from falconet.models.falcon import Falcon
from falconet.models.falcon_config import FalconConfig
from falconet.models.registry import for_config
from falconet.tokenizer import Tokenizer

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def ungroup_qkv(t: torch.Tensor, config: FalconConfig) -> torch.Tensor:
    """[all Q | all K | all V] -> HF's grouped rows (inverse of models.falcon.regroup_qkv)."""
    H, K, D = config.num_attention_heads, config.kv_heads, config.head_dim
    G = H // K
    rest = t.shape[1:]
    q = t[: H * D].reshape(K, G, D, *rest)
    k = t[H * D : (H + K) * D].reshape(K, 1, D, *rest)
    v = t[(H + K) * D :].reshape(K, 1, D, *rest)
    return torch.cat([q, k, v], dim=1).reshape(t.shape)


def hf_state_dict(model: Falcon, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    config = model.config
    out = {}
    for name, p in model.named_parameters():  # shared (tied) parameters appear once
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        t = p.detach()
        if "query_key_value" in name and config.kv_heads != 1:
            t = ungroup_qkv(t, config)
        out[name] = t.to(dtype or t.dtype).contiguous()
    return out


def save_hf(
    model: Falcon,
    tokenizer: Tokenizer,
    folder: Path,
    dtype: torch.dtype = torch.float32,
    model_card: str | None = None,
) -> None:
    """Publish the model as a HF folder at `folder` (replacing it if it exists)."""
    config = model.config
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = DTYPE_NAMES[dtype]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_ids[0]
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tokenizer.id_to_token(eos),
        "model_max_length": config.max_position_embeddings,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    if tokenizer.chat_template:
        tok_config["chat_template"] = tokenizer.chat_template
    generation = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "_from_model_config": True,
    }
    tensors = hf_state_dict(model, dtype)
    with publish_folder(folder) as tmp:
        atomic_write(
            tmp / "model.safetensors",
            lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
        )
        atomic_write_text(
            tmp / "config.json", json.dumps(hf_config, indent=2, sort_keys=True) + "\n"
        )
        atomic_write(tmp / "tokenizer.json", lambda p: tokenizer.backend.save(str(p)))
        atomic_write_text(tmp / "tokenizer_config.json", json.dumps(tok_config, indent=2) + "\n")
        atomic_write_text(tmp / "generation_config.json", json.dumps(generation, indent=2) + "\n")
        if model_card:
            atomic_write_text(tmp / "README.md", model_card)


# Files of a model folder that are weights (or their index): rewritten, never copied.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _tokenizer_limit(data: bytes, limit: object) -> bytes:
    """tokenizer_config.json with `model_max_length` set to the model's position limit
    (fine-tuning may have raised it), left as it is otherwise."""
    config = json.loads(data)
    if not isinstance(limit, int) or config.get("model_max_length") in (None, limit):
        return data
    return (json.dumps(dict(config, model_max_length=limit), indent=2) + "\n").encode()


def save_like(
    model: CausalLM,
    base_folder: Path,
    folder: Path,
    dtype: torch.dtype = torch.float32,
    model_card: str | None = None,
    hf_config: dict | None = None,
) -> None:
    """Publish `model` (any registered architecture) as a HF folder shaped like the one it
    was loaded from: the base folder's config (or `hf_config`, the one it was built
    from), tokenizer and other small files copied,
    model.safetensors written from the model's parameters under the checkpoint's names
    (rows put back in the checkpoint's order where loading reordered them)."""
    config = model.config
    layout = for_config(config).layout(config)
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = {}
    for name in layout.shapes:
        if name in layout.skipped:
            continue
        t = to_hf_rows(params[name].detach(), layout.transforms.get(name))
        tensors[name] = t.to(dtype).contiguous()
    if hf_config is None:
        hf_config = json.loads((base_folder / "config.json").read_text(encoding="utf-8"))
    hf_config = dict(hf_config)
    hf_config["torch_dtype"] = DTYPE_NAMES[dtype]
    with publish_folder(folder) as tmp:
        for f in sorted(base_folder.iterdir()):
            if not f.is_file() or f.suffix in WEIGHT_FILE_SUFFIXES or f.name in WEIGHT_INDEXES:
                continue
            if f.name in ("config.json", "README.md"):
                continue
            data = f.read_bytes()
            if f.name == "tokenizer_config.json":
                data = _tokenizer_limit(data, hf_config.get("max_position_embeddings"))
            atomic_write_bytes(tmp / f.name, data)
        atomic_write(
            tmp / "model.safetensors",
            lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
        )
        atomic_write_text(
            tmp / "config.json", json.dumps(hf_config, indent=2, sort_keys=True) + "\n"
        )
        if model_card:
            atomic_write_text(tmp / "README.md", model_card)
