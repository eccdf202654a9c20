"""Llama-architecture configuration (Falcon3, Falcon-Arabic): plain data with HF key names.

Falcon3 (TII, Dec 2024) is a `LlamaForCausalLM`. Its published configs:

| model       | hidden | ffn   | layers | heads / kv | head_dim | vocab  | rope_theta | rms eps |
|-------------|--------|-------|--------|------------|----------|--------|------------|---------|
| Falcon3-1B  | 2048   | 8192  | 18     | 8 / 4      | 256      | 131072 | 1000042    | 1e-6    |
| Falcon3-3B  | 3072   | 9216  | 22     | 12 / 4     | 256      | 131072 | 1000042    | 1e-6    |
| Falcon3-7B  | 3072   | 23040 | 28     | 12 / 4     | 256      | 131072 | 1000042    | 1e-6    |
| Falcon3-10B | 3072   | 23040 | 40     | 12 / 4     | 256      | 131072 | 1000042    | 1e-6    |

They write head_dim as its own key; other llama checkpoints may make it differ from
hidden / heads, which is honoured. Any config of this shape -- GQA or MHA, tied or
untied head, biases, rope scaling of type linear, dynamic (NTK) or llama3 -- is read.

Sources: transformers `models/llama/configuration_llama.py` (v5, `rope_parameters`) and
v4 (`rope_theta` + `rope_scaling`), `modeling_rope_utils.py` for the scaling keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from falconet.errors import ConfigError
from falconet.models.falcon_config import (
    ACTIVATIONS,
    HFConfigFile,
    _is_finite_number,
    _is_positive_int,
)
from falconet.quant.ternary import BitNetConfig

LLAMA_MODEL_TYPES = ("llama",)
ROPE_SCALING_TYPES = ("linear", "dynamic", "llama3")
# rope_parameters keys only llama3 scaling reads (transformers' _compute_llama3_parameters)
LLAMA3_KEYS = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Fields that must be positive integers.
SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)
# Fields read from (and written to) config.json under their own name.
HF_KEYS = (
    *SIZES,
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "bos_token_id",
    "pad_token_id",
)
# config.json keys read into other fields (rope_*, eos_token_ids, torch_dtype).
READ_APART = (
    "model_type",
    "eos_token_id",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "torch_dtype",
    "dtype",
    "quantization_config",
)


class RotaryGQAConfig(HFConfigFile):
    """What the Llama-style configs (Falcon3, Falcon-H1's attention) share: the names the
    shared code reads from every config, and transformers' llama3 rope fallback."""

    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rope_scaling_type: str | None
    rope_original_max_position_embeddings: int | None

    @property
    def kv_heads(self) -> int:
        """KV heads the model uses and the KV cache stores."""
        return self.num_key_value_heads

    @property
    def alibi(self) -> bool:
        return False

    @property
    def rotary(self) -> bool:
        return True

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size

    def kv_cache_bytes_per_token(self, bytes_per_value: int) -> int:
        return 2 * self.num_hidden_layers * self.kv_heads * self.head_dim * bytes_per_value

    def _default_llama3_original(self) -> None:
        # transformers' standardize_rope_params falls back the same way
        if (
            self.rope_scaling_type == "llama3"
            and self.rope_original_max_position_embeddings is None
        ):
            object.__setattr__(
                self, "rope_original_max_position_embeddings", self.max_position_embeddings
            )


@dataclass(frozen=True)
class LlamaConfig(RotaryGQAConfig):
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    # None means what transformers means: num_attention_heads (MHA) and
    # hidden_size // num_attention_heads. Both are resolved to ints on construction.
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling_type: str | None = None  # None (plain RoPE), "linear", "dynamic", "llama3"
    rope_scaling_factor: float = 1.0
    # llama3 scaling only: the band between these wavelengths is interpolated
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_max_position_embeddings: int | None = None
    # Per-frequency divisors of the rotary frequencies (head_dim / 2 of them): how a GGUF
    # file stores llama3 scaling (llama.cpp's rope_freqs tensor). Not an HF key.
    rope_freq_factors: tuple[float, ...] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the checkpoint's dtype, used by dtype="auto"
    # quantization_config of a ternary checkpoint (Falcon-E, Falcon3-1.58bit), else None
    bitnet: BitNetConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        self._default_llama3_original()

    # ---- derived values (the names shared code reads from FalconConfig too) -----------
    @property
    def variant(self) -> str:
        """A human name for the layout (never used to choose behaviour)."""
        H, K = self.num_attention_heads, self.kv_heads
        heads = "MHA" if K == H else "multi-query" if K == 1 else f"GQA {H}q/{K}kv"
        rope = f", {self.rope_scaling_type} rope scaling" if self.rope_scaling_type else ""
        rope += ", rope_freqs" if self.rope_freq_factors else ""
        head = "tied" if self.tie_word_embeddings else "untied"
        ternary = ", ternary (bitnet)" if self.bitnet else ""
        return f"llama-style ({heads}, head_dim {self.head_dim}{rope}, {head} head{ternary})"

    # ---- checks -----------------------------------------------------------------------
    def _validate(self) -> None:
        for name in SIZES:
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ConfigError(f"config: {name} must be a positive integer, got {value!r}")
        H, K, D = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        if K is not None and not _is_positive_int(K):
            raise ConfigError(f"config: num_key_value_heads must be a positive integer, got {K!r}")
        if K is not None and H % K:
            raise ConfigError(
                f"config: num_attention_heads {H} is not a multiple of num_key_value_heads {K}; "
                "each kv head must serve the same number of query heads"
            )
        if D is None and self.hidden_size % H:
            raise ConfigError(
                f"config: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{H}; set head_dim explicitly if the heads are not hidden_size / heads wide"
            )
        head_dim = self.hidden_size // H if D is None else D
        if not _is_positive_int(head_dim) or head_dim % 2:
            raise ConfigError(
                f"config: head_dim must be a positive even integer for rotary embeddings, got {head_dim!r}"
            )
        for name in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"config: {name} must be true or false, got {getattr(self, name)!r}"
                )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"config: hidden_act {self.hidden_act!r} is not supported; use one of {ACTIVATIONS}"
            )
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not (_is_finite_number(value) and value > 0):
                raise ConfigError(f"config: {name} must be a positive number, got {value!r}")
        self._check_token_ids()
        self._validate_rope_scaling(head_dim)
        if self.bitnet is not None:  # four 2-bit codes of four output rows per byte
            outputs = {
                "q_proj": H * head_dim,
                "k_proj": (K or H) * head_dim,
                "o_proj": self.hidden_size,
                "gate_proj": self.intermediate_size,
            }
            for name, n in outputs.items():
                if n % 4:
                    raise ConfigError(
                        f"config: ternary (bitnet) projections need multiples of 4 output "
                        f"features; {name} has {n}"
                    )
        factors = self.rope_freq_factors
        if factors is not None and not (
            isinstance(factors, tuple)
            and len(factors) == head_dim // 2
            and all(_is_finite_number(f) and f > 0 for f in factors)
        ):
            raise ConfigError(
                f"config: rope_freq_factors must be {head_dim // 2} positive numbers (one per "
                f"rotary frequency), got {factors!r}"
            )

    def _validate_rope_scaling(self, head_dim: int) -> None:
        kind = self.rope_scaling_type
        if kind is None:
            return
        self._check_rope_scaling(ROPE_SCALING_TYPES)
        if kind == "dynamic" and head_dim <= 2:
            raise ConfigError(f"config: dynamic rope_scaling needs a head_dim > 2, got {head_dim}")
        if kind != "llama3":
            return
        low, high = self.rope_low_freq_factor, self.rope_high_freq_factor
        for name, value in (("low_freq_factor", low), ("high_freq_factor", high)):
            if not (_is_finite_number(value) and value > 0):
                raise ConfigError(
                    f"config: llama3 rope_scaling needs {name}, a positive number; got {value!r}"
                )
        if high <= low:
            raise ConfigError(
                f"config: llama3 rope_scaling needs high_freq_factor > low_freq_factor, got "
                f"{high!r} and {low!r}"
            )
        original = self.rope_original_max_position_embeddings
        if original is not None and not _is_positive_int(original):
            raise ConfigError(
                "config: rope_scaling original_max_position_embeddings must be a positive "
                f"integer, got {original!r}"
            )

    # ---- reading and writing HF config.json --------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Build from a HF `config.json` dict (transformers v5 `rope_parameters` or v4
        `rope_theta` + `rope_scaling`). A `quantization_config` is read only for BitNet
        (ternary) checkpoints; other pre-quantized checkpoints are refused."""
        quant = hf.get("quantization_config") if isinstance(hf, dict) else None
        bitnet = None
        if isinstance(quant, dict) and quant.get("quant_method") == "bitnet":
            bitnet = BitNetConfig.from_hf(quant)
            hf = {k: v for k, v in hf.items() if k != "quantization_config"}
        cls._check_hf(
            hf,
            LLAMA_MODEL_TYPES,
            "llama",
            "falconet loads float llama checkpoints: use the bfloat16 revision of the model",
        )
        defaults = cls.__dataclass_fields__
        kwargs: dict[str, Any] = {}
        for name in HF_KEYS:
            value = hf.get(name)
            kwargs[name] = defaults[name].default if value is None else value
        for name in ("num_key_value_heads", "head_dim", "bos_token_id", "pad_token_id"):
            if name in hf:  # an explicit null means "derive it" / "no token"
                kwargs[name] = hf[name]
        eos_ids = cls._eos_ids(hf, 2)
        known = set(HF_KEYS) | set(READ_APART)
        return cls(
            **kwargs,
            **_rope_from_hf(hf),
            eos_token_ids=eos_ids,
            torch_dtype=cls._hf_dtype(hf),
            bitnet=bitnet,
            extra={k: v for k, v in hf.items() if k not in known},
        )

    def to_hf(self) -> dict[str, Any]:
        """The config as transformers' `LlamaConfig` writes it (v5 `rope_parameters`, and
        `rope_theta` for v4 readers)."""
        d = {k: v for k, v in asdict(self).items() if k in HF_KEYS}
        d["eos_token_id"] = (
            self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        )
        rope: dict[str, Any] = {
            "rope_type": self.rope_scaling_type or "default",
            "rope_theta": self.rope_theta,
        }
        if self.rope_scaling_type:
            rope["factor"] = self.rope_scaling_factor
        if self.rope_scaling_type == "llama3":
            rope["low_freq_factor"] = self.rope_low_freq_factor
            rope["high_freq_factor"] = self.rope_high_freq_factor
            rope["original_max_position_embeddings"] = self.rope_original_max_position_embeddings
        d["rope_parameters"] = rope
        d["rope_theta"] = self.rope_theta
        d["model_type"] = "llama"
        d["architectures"] = ["LlamaForCausalLM"]
        if self.torch_dtype:
            d["torch_dtype"] = self.torch_dtype
        if self.bitnet:
            d["quantization_config"] = self.bitnet.to_hf()
        return d


def _rope_from_hf(d: dict[str, Any]) -> dict[str, Any]:
    """The rope_* fields from `rope_parameters` (v5) or `rope_theta` + `rope_scaling` (v4)."""
    params, scaling = d.get("rope_parameters"), d.get("rope_scaling")
    theta = d.get("rope_theta", 10000.0)
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"config: {key} must be an object, got {value!r}")
    if params is not None:
        theta = params.get("rope_theta", theta)
        scaling = params
    out: dict[str, Any] = {"rope_theta": theta}
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind in (None, "default"):
        return out
    out["rope_scaling_type"] = kind
    out["rope_scaling_factor"] = scaling.get("factor")
    if kind == "llama3":
        for key in LLAMA3_KEYS:
            out[f"rope_{key}"] = scaling.get(key)
    return out
