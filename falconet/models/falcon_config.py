"""Falcon model configuration: plain data with Hugging Face key names.

One `FalconConfig` covers every Falcon variant. The variants differ in four switches:

| variant            | attention               | block                         | position |
|--------------------|-------------------------|-------------------------------|----------|
| falcon-rw-1b       | MHA (kv_heads = heads)  | sequential, two norms, biases | ALiBi    |
| falcon-7b          | multi-query (1 kv head) | parallel, one shared norm     | rotary   |
| falcon-40b / 180b  | grouped (8 kv heads)    | parallel, ln_attn + ln_mlp    | rotary   |
| Falcon2-11B        | grouped (8 kv heads)    | parallel, one shared norm     | rotary   |

Sources: transformers `models/falcon/configuration_falcon.py` (current and v4.3x),
the legacy RefinedWeb configs and `convert_custom_code_checkpoint.py`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from falconet.errors import ConfigError

FALCON_MODEL_TYPES = ("falcon", "RefinedWeb", "RefinedWebModel")

# Activations HF's `get_activation` names, that a Falcon config may carry.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu")

ROPE_SCALING_TYPES = ("linear", "dynamic")


class HFConfigFile:
    """`from_file` for a config class with `from_hf`: config.json read once, errors
    naming the file (shared by every architecture's config)."""

    @classmethod
    def from_file(cls, path: str | Path):
        path = Path(path)
        data = read_config_json(path)
        try:
            return cls.from_hf(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @staticmethod
    def _check_hf(
        hf: Any, model_types: tuple[str, ...], family: str, quantized_hint: str | None = None
    ) -> None:
        """What every config.json must be before its keys are read: a JSON object of one
        of `model_types`. With `quantized_hint`, a `quantization_config` (a pre-quantized
        checkpoint falconet cannot load) is refused, naming its method and the hint."""
        if not isinstance(hf, dict):
            raise ConfigError(f"config: expected a JSON object, got {type(hf).__name__}")
        if hf.get("model_type") not in model_types:
            raise ConfigError(
                f"config: model_type {hf.get('model_type')!r} is not a {family} model "
                f"(expected one of {', '.join(model_types)})"
            )
        quant = hf.get("quantization_config")
        if quantized_hint is not None and quant is not None:
            method = quant.get("quant_method") if isinstance(quant, dict) else quant
            raise ConfigError(
                f"config: the checkpoint is quantized (quantization_config {method!r}); "
                + quantized_hint
            )

    @staticmethod
    def _eos_ids(hf: dict[str, Any], default: int) -> tuple[Any, ...]:
        """config.json's eos_token_id (one id, a list, or null for none) as a tuple."""
        eos = hf.get("eos_token_id", default)
        return tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))

    @staticmethod
    def _hf_dtype(hf: dict[str, Any]) -> str | None:
        """The checkpoint's dtype name (transformers v4 `torch_dtype`, v5 `dtype`)."""
        dtype = hf.get("torch_dtype", hf.get("dtype"))
        return dtype if isinstance(dtype, str) else None

    # Checks of keys every architecture's config.json carries alike.
    def _check_token_ids(self) -> None:
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not _is_token_id(value):
                raise ConfigError(
                    f"config: {name} must be a token id (an integer >= 0), got {value!r}"
                )
        if not all(_is_token_id(t) for t in self.eos_token_ids):
            raise ConfigError(
                f"config: eos_token_id must be a token id or a list of them, got {list(self.eos_token_ids)!r}"
            )

    def _check_rope_scaling(self, supported: tuple[str, ...]) -> None:
        if self.rope_scaling_type not in supported:
            raise ConfigError(
                f"config: rope_scaling type {self.rope_scaling_type!r} is not supported; "
                f"falconet supports {supported}"
            )
        factor = self.rope_scaling_factor
        if not (_is_finite_number(factor) and factor >= 1):
            raise ConfigError(f"config: rope_scaling factor must be a number >= 1, got {factor!r}")


@dataclass(frozen=True)
class FalconConfig(HFConfigFile):
    vocab_size: int = 65024
    hidden_size: int = 4544
    num_hidden_layers: int = 32
    num_attention_heads: int = 71
    # As written in config.json; the heads actually used are `kv_heads` below
    # (7B configs say 71 but multi_query means 1).
    num_kv_heads: int | None = None
    multi_query: bool = True
    new_decoder_architecture: bool = False
    parallel_attn: bool = True
    num_ln_in_parallel_attn: int | None = None
    alibi: bool = False
    bias: bool = False
    layer_norm_epsilon: float = 1e-5
    ffn_hidden_size: int | None = None
    activation: str = "gelu"
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling_type: str | None = None  # None (plain RoPE), "linear" or "dynamic"
    rope_scaling_factor: float = 1.0
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 11
    eos_token_ids: tuple[int, ...] = (11,)
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the checkpoint's dtype, used by dtype="auto"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()

    # ---- derived values -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        """KV heads the model really uses (and the KV cache stores)."""
        if self.new_decoder_architecture:
            return self.num_kv_heads or self.num_attention_heads
        return 1 if self.multi_query else self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def rotary(self) -> bool:
        return not self.alibi

    @property
    def block_layout(self) -> str:
        """ "sequential" (rw), "parallel" (one shared norm: 7B, 11B) or "parallel_2ln" (40B/180B)."""
        if self.new_decoder_architecture:
            # new_decoder_architecture ignores `parallel_attn`: it is always parallel.
            return "parallel_2ln" if (self.num_ln_in_parallel_attn or 2) == 2 else "parallel"
        return "parallel" if self.parallel_attn else "sequential"

    @property
    def qkv_size(self) -> int:
        return (self.num_attention_heads + 2 * self.kv_heads) * self.head_dim

    @property
    def variant(self) -> str:
        """A human name for the layout (never used to choose behaviour)."""
        if self.alibi:
            return "falcon-rw (ALiBi, MHA, sequential)"
        if self.new_decoder_architecture:
            norms = "ln_attn+ln_mlp" if self.block_layout == "parallel_2ln" else "one norm"
            return f"falcon-40b style (grouped, {self.kv_heads} kv heads, {norms})"
        if self.multi_query:
            return "falcon-7b style (multi-query, parallel)"
        return "falcon (MHA, rotary)"

    def kv_cache_bytes_per_token(self, bytes_per_value: int) -> int:
        return 2 * self.num_hidden_layers * self.kv_heads * self.head_dim * bytes_per_value

    # ---- checks -----------------------------------------------------------------
    def _validate(self) -> None:
        positive = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        for name in ("num_kv_heads", "ffn_hidden_size"):
            value = getattr(self, name)
            if value is not None and not _is_positive_int(value):
                raise ConfigError(f"config: {name} must be a positive integer, got {value!r}")
        # Checked for every layout: transformers reads the value only in some, but 0 or 3
        # is never a Falcon config.
        num_ln = self.num_ln_in_parallel_attn
        if num_ln is not None and not (_is_positive_int(num_ln) and num_ln in (1, 2)):
            raise ConfigError(f"config: num_ln_in_parallel_attn must be 1 or 2, got {num_ln!r}")
        self._check_token_ids()
        if self.new_decoder_architecture:
            kv = self.kv_heads
            if kv <= 0 or self.num_attention_heads % kv:
                raise ConfigError(
                    f"config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                    f"num_kv_heads {kv}"
                )
        elif not self.multi_query and self.num_kv_heads not in (None, self.num_attention_heads):
            raise ConfigError(
                f"config: num_kv_heads {self.num_kv_heads} with multi_query=false and "
                "new_decoder_architecture=false; this layout only supports kv heads = "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        elif self.parallel_attn and self.num_ln_in_parallel_attn == 2:
            raise ConfigError(
                "config: num_ln_in_parallel_attn=2 needs new_decoder_architecture=true "
                "(transformers cannot run this combination either)"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"config: activation {self.activation!r} is not supported; use one of {ACTIVATIONS}"
            )
        if self.rope_scaling_type is not None:
            if self.alibi:
                raise ConfigError(
                    "config: rope_scaling is set but the model uses ALiBi, not rotary"
                )
            self._check_rope_scaling(ROPE_SCALING_TYPES)
        if not self.alibi and self.head_dim % 2:
            raise ConfigError(
                f"config: head size {self.head_dim} (hidden_size / num_attention_heads) must be even "
                "for rotary embeddings"
            )
        if self.rope_scaling_type == "dynamic" and self.head_dim <= 2:
            raise ConfigError(
                f"config: dynamic rope_scaling needs a head size > 2, got {self.head_dim}"
            )
        if not (_is_finite_number(self.rope_theta) and self.rope_theta > 0):
            raise ConfigError(
                f"config: rope_theta must be a positive number, got {self.rope_theta!r}"
            )
        if not (_is_finite_number(self.layer_norm_epsilon) and self.layer_norm_epsilon > 0):
            raise ConfigError(
                f"config: layer_norm_epsilon must be a positive number, got {self.layer_norm_epsilon!r}"
            )

    # ---- reading and writing HF config.json ------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> FalconConfig:
        """Build from a HF `config.json` dict: current `falcon` and legacy RefinedWeb keys."""
        cls._check_hf(hf, FALCON_MODEL_TYPES, "Falcon")
        d = dict(hf)
        # Legacy RefinedWeb names (convert_custom_code_checkpoint.py renames these).
        renames = {
            "n_head": "num_attention_heads",
            "n_layer": "num_hidden_layers",
            "n_head_kv": "num_kv_heads",
            "n_embed": "hidden_size",
        }
        for old, new in renames.items():
            if old in d:
                # transformers lets n_embed override hidden_size; the others are aliases.
                if old == "n_embed":
                    d[new] = d[old]
                else:
                    d.setdefault(new, d[old])
        if "new_decoder_architecture" not in d:
            # The HF converter sets it iff n_head_kv was present; TGI also infers it
            # for model_type RefinedWeb (the 40B custom code).
            d["new_decoder_architecture"] = "n_head_kv" in hf or hf["model_type"] == "RefinedWeb"

        rope_theta, scaling_type, factor = rope_from_hf(d)
        eos_ids = cls._eos_ids(d, 11)
        defaults = cls.__dataclass_fields__
        kwargs: dict[str, Any] = {}
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_kv_heads",
            "multi_query",
            "new_decoder_architecture",
            "parallel_attn",
            "num_ln_in_parallel_attn",
            "alibi",
            "bias",
            "layer_norm_epsilon",
            "ffn_hidden_size",
            "activation",
            "max_position_embeddings",
            "tie_word_embeddings",
            "bos_token_id",
            "pad_token_id",
        ):
            if name in d and d[name] is not None:
                kwargs[name] = d[name]
            elif name in ("num_kv_heads", "num_ln_in_parallel_attn", "ffn_hidden_size"):
                kwargs[name] = None
            else:
                kwargs[name] = defaults[name].default
        for name in (
            "multi_query",
            "new_decoder_architecture",
            "parallel_attn",
            "alibi",
            "bias",
            "tie_word_embeddings",
        ):
            if not isinstance(kwargs[name], bool):
                raise ConfigError(f"config: {name} must be true or false, got {kwargs[name]!r}")
        known = (
            set(kwargs)
            | set(renames)
            | {
                "model_type",
                "eos_token_id",
                "rope_theta",
                "rope_scaling",
                "rope_parameters",
                "torch_dtype",
                "dtype",
            }
        )
        return cls(
            **kwargs,
            rope_theta=rope_theta,
            rope_scaling_type=scaling_type,
            rope_scaling_factor=factor,
            eos_token_ids=eos_ids,
            torch_dtype=cls._hf_dtype(hf),
            extra={k: v for k, v in hf.items() if k not in known},
        )

    def to_hf(self) -> dict[str, Any]:
        """The config as transformers' `FalconConfig` writes it (model_type falcon)."""
        d = asdict(self)
        for k in (
            "rope_theta",
            "rope_scaling_type",
            "rope_scaling_factor",
            "eos_token_ids",
            "extra",
            "torch_dtype",
        ):
            d.pop(k)
        d["num_kv_heads"] = self.num_kv_heads if self.num_kv_heads is not None else self.kv_heads
        d["ffn_hidden_size"] = self.ffn_size
        d["eos_token_id"] = (
            self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        )
        rope: dict[str, Any] = {
            "rope_type": self.rope_scaling_type or "default",
            "rope_theta": self.rope_theta,
        }
        if self.rope_scaling_type:
            rope["factor"] = self.rope_scaling_factor
        d["rope_parameters"] = rope
        d["rope_theta"] = self.rope_theta
        d["model_type"] = "falcon"
        d["architectures"] = ["FalconForCausalLM"]
        if self.torch_dtype:
            d["torch_dtype"] = self.torch_dtype
        return d


def read_config_json(path: Path) -> Any:
    """The parsed config.json at `path`; ConfigError naming the file if it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json; is this a Hugging Face model folder?") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:  # a folder named config.json, no read permission
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_finite_number(value: Any) -> bool:
    # bool is an int subclass; `"rope_theta": true` is a typo, not 1.0.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def rope_from_hf(d: dict[str, Any]) -> tuple[float, str | None, float]:
    """rope_theta and scaling from either `rope_parameters` (transformers v5) or
    `rope_theta` + `rope_scaling` (v4)."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    theta = d.get("rope_theta", 10000.0)
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        scaling = params
    elif params is not None:
        raise ConfigError(f"config: rope_parameters must be an object, got {params!r}")
    if scaling is None:
        return theta, None, 1.0
    if not isinstance(scaling, dict):
        raise ConfigError(f"config: rope_scaling must be an object, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return theta, None, 1.0
    return theta, kind, scaling.get("factor", 1.0)
