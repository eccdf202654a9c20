"""Falcon-H1 configuration: plain data with HF key names.

Falcon-H1 (TII, May 2025: 0.5B, 1.5B, 1.5B-Deep, 3B, 7B, 34B) is transformers'
`FalconH1ForCausalLM`: every layer runs grouped-query attention and a Mamba-2 mixer side
by side on the same normed input (falcon_h1.py draws the block). Its config adds to a
Llama-style one the Mamba-2 sizes (`mamba_*`) and the muP multipliers the model was
trained with, which scale activations at fixed places rather than being folded into
the weights (falcon_h1.py says where each applies).

Sources: transformers `models/falcon_h1/configuration_falcon_h1.py` (v5) and
`modeling_falcon_h1.py`; `modeling_rope_utils.py` for the rope scaling keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from falconet.errors import ConfigError
from falconet.models.falcon_config import (
    ACTIVATIONS,
    _is_finite_number,
    _is_positive_int,
)
from falconet.models.falcon_mamba_config import recurrent_state_bytes
from falconet.models.llama_config import (
    LLAMA3_KEYS,
    ROPE_SCALING_TYPES,
    RotaryGQAConfig,
    _rope_from_hf,
)

FALCON_H1_MODEL_TYPES = ("falcon_h1",)
# Keys a Falcon-H1 config.json must give (transformers writes them all): without them
# the class defaults would describe some other model, found only at the first tensor.
REQUIRED_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "mamba_n_heads", "mamba_d_state", "mamba_d_conv", "mamba_n_groups",
)  # fmt: skip
# Fields that must be positive integers once resolved.
SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "mamba_n_heads",
    "mamba_n_groups",
    "mamba_d_state",
    "mamba_d_conv",
    "mamba_chunk_size",
)
BOOLS = (
    "attention_bias",
    "mlp_bias",
    "projectors_bias",
    "mamba_conv_bias",
    "mamba_proj_bias",
    "mamba_rms_norm",
    "mamba_norm_before_gate",
    "tie_word_embeddings",
)
MULTIPLIERS = (
    "embedding_multiplier",
    "lm_head_multiplier",
    "key_multiplier",
    "attention_in_multiplier",
    "attention_out_multiplier",
    "ssm_in_multiplier",
    "ssm_out_multiplier",
)
# Fields read from config.json under their own name (None there means the default).
HF_KEYS = (
    *SIZES,
    *BOOLS,
    *MULTIPLIERS,
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "mamba_d_ssm",
    "mamba_d_head",
    "mamba_expand",
    "bos_token_id",
    "pad_token_id",
)
# config.json keys read into other fields (or reshaped: lists become tuples).
READ_APART = (
    "model_type",
    "eos_token_id",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "torch_dtype",
    "dtype",
    "time_step_limit",
    "ssm_multipliers",
    "mlp_multipliers",
)


@dataclass(frozen=True)
class FalconH1Config(RotaryGQAConfig):
    vocab_size: int = 128000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8  # None: MHA, as transformers resolves it
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"  # the MLP's gate and the Mamba conv's activation alike
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    # Falcon-H1 configs use bases up to 1e11 (tests use that).
    rope_theta: float = 10000.0
    rope_scaling_type: str | None = None
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_max_position_embeddings: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    projectors_bias: bool = False  # the Mamba out_proj's bias (transformers' naming)
    # ---- Mamba-2 mixer ----
    mamba_d_ssm: int | None = 1024  # None: mamba_expand * hidden_size
    mamba_n_heads: int = 128
    mamba_d_head: int | None = None  # None ("auto" in config.json): d_ssm // n_heads
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False  # in_proj's bias
    mamba_rms_norm: bool = False
    mamba_norm_before_gate: bool = True
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    # ---- muP multipliers ----
    embedding_multiplier: float = 1.0
    lm_head_multiplier: float = 1.0
    key_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    ssm_multipliers: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)  # z, x, B, C, dt
    mlp_multipliers: tuple[float, ...] = (1.0, 1.0)  # gate, down
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = 0
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()
        resolved = {
            "num_key_value_heads": self.num_key_value_heads or self.num_attention_heads,
            "head_dim": self.head_dim or self.hidden_size // self.num_attention_heads,
            "mamba_d_ssm": self.mamba_d_ssm or self.mamba_expand * self.hidden_size,
        }
        for name, value in resolved.items():
            object.__setattr__(self, name, value)
        if self.mamba_d_head is None:
            object.__setattr__(self, "mamba_d_head", self.mamba_d_ssm // self.mamba_n_heads)
        self._default_llama3_original()

    # ---- derived values (names shared code reads from every config) --------------------
    @property
    def conv_dim(self) -> int:
        """Channels of the Mamba causal conv: x, B and C side by side."""
        return self.mamba_d_ssm + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def in_proj_size(self) -> int:
        """Rows of the Mamba in_proj: z (gate), then xBC, then dt (one per head)."""
        return self.mamba_d_ssm + self.conv_dim + self.mamba_n_heads

    def ssm_state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """One sequence's Mamba state of one layer: the conv's last mamba_d_conv - 1
        inputs (conv_dim, d_conv - 1) and the SSM state (heads, d_head, d_state)."""
        return (
            (self.conv_dim, self.mamba_d_conv - 1),
            (self.mamba_n_heads, self.mamba_d_head, self.mamba_d_state),
        )

    def state_bytes_per_sequence(self, conv_bytes: int, ssm_bytes: int = 4) -> int:
        """The recurrent part only; the attention KV grows with the length on top."""
        return recurrent_state_bytes(self, conv_bytes, ssm_bytes)

    @property
    def variant(self) -> str:
        """A human name for the layout (never used to choose behaviour)."""
        H, K = self.num_attention_heads, self.kv_heads
        heads = "MHA" if K == H else f"GQA {H}q/{K}kv"
        return (
            f"falcon-h1 ({heads}, head_dim {self.head_dim}; Mamba-2 {self.mamba_n_heads} heads "
            f"x {self.mamba_d_head}, {self.mamba_n_groups} groups, state {self.mamba_d_state})"
        )

    # ---- checks -----------------------------------------------------------------------
    def _validate(self) -> None:
        for name in SIZES:
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ConfigError(f"config: {name} must be a positive integer, got {value!r}")
        for name in ("num_key_value_heads", "head_dim", "mamba_d_ssm", "mamba_d_head"):
            value = getattr(self, name)
            if value is not None and not _is_positive_int(value):
                raise ConfigError(f"config: {name} must be a positive integer, got {value!r}")
        if not _is_positive_int(self.mamba_expand):
            raise ConfigError(
                f"config: mamba_expand must be a positive integer, got {self.mamba_expand!r}"
            )
        for name in BOOLS:
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
        for name in MULTIPLIERS:
            if not _is_finite_number(getattr(self, name)):
                raise ConfigError(f"config: {name} must be a number, got {getattr(self, name)!r}")
        for name, count in (("ssm_multipliers", 5), ("mlp_multipliers", 2)):
            value = getattr(self, name)
            if not (
                isinstance(value, tuple)
                and len(value) == count
                and all(_is_finite_number(v) for v in value)
            ):
                raise ConfigError(
                    f"config: {name} must be a list of {count} numbers, got {value!r}"
                )
        self._validate_attention()
        self._validate_mamba()
        self._check_token_ids()
        if self.rope_scaling_type is not None:
            self._check_rope_scaling(ROPE_SCALING_TYPES)

    def _validate_attention(self) -> None:
        H, K, D = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        if K is not None and H % K:
            raise ConfigError(
                f"config: num_attention_heads {H} is not a multiple of num_key_value_heads {K}"
            )
        if D is None and self.hidden_size % H:
            raise ConfigError(
                f"config: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{H}; set head_dim explicitly"
            )
        if (D or self.hidden_size // H) % 2:
            raise ConfigError(
                f"config: head_dim must be even for rotary embeddings, got {D or self.hidden_size // H}"
            )

    def _validate_mamba(self) -> None:
        d_ssm = self.mamba_d_ssm or self.mamba_expand * self.hidden_size
        heads, groups = self.mamba_n_heads, self.mamba_n_groups
        if d_ssm % heads:
            raise ConfigError(
                f"config: mamba_n_heads {heads} does not divide the Mamba width {d_ssm} "
                "(mamba_d_ssm, or mamba_expand * hidden_size)"
            )
        d_head = self.mamba_d_head
        if d_head is not None and d_head * heads != d_ssm:
            raise ConfigError(
                f"config: mamba_d_head {d_head} x mamba_n_heads {heads} must equal the Mamba "
                f"width {d_ssm} (mamba_d_ssm)"
            )
        if heads % groups:
            raise ConfigError(
                f"config: mamba_n_groups {groups} must divide mamba_n_heads {heads}; each group's "
                "B and C serve the same number of heads"
            )
        limit = self.time_step_limit
        if not (
            isinstance(limit, tuple)
            and len(limit) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in limit)
            and 0 <= limit[0] <= limit[1]
        ):
            raise ConfigError(
                f"config: time_step_limit must be [low, high] with 0 <= low <= high, got {limit!r}"
            )

    # ---- reading HF config.json ----------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> FalconH1Config:
        """Build from a HF `config.json` dict (v5 `rope_parameters` or v4 `rope_theta`)."""
        cls._check_hf(
            hf, FALCON_H1_MODEL_TYPES, "Falcon-H1", "falconet loads float Falcon-H1 checkpoints"
        )
        missing = [k for k in REQUIRED_KEYS if hf.get(k) is None]
        if missing:
            raise ConfigError(
                f"config: no {missing[0]}; a Falcon-H1 config.json must give "
                f"{', '.join(REQUIRED_KEYS)}"
            )
        defaults = cls.__dataclass_fields__
        kwargs: dict[str, Any] = {}
        for name in HF_KEYS:
            value = hf.get(name)
            kwargs[name] = defaults[name].default if value is None else value
        for name in (
            "num_key_value_heads",
            "head_dim",
            "mamba_d_ssm",
            "bos_token_id",
            "pad_token_id",
        ):
            if name in hf:  # an explicit null means "derive it" / "no token"
                kwargs[name] = hf[name]
        if kwargs["mamba_d_head"] == "auto":
            kwargs["mamba_d_head"] = None
        for name in ("ssm_multipliers", "mlp_multipliers", "time_step_limit"):
            value = hf.get(name)
            if value is not None:
                kwargs[name] = tuple(map(_json_float, value)) if isinstance(value, list) else value
        eos_ids = cls._eos_ids(hf, 2)
        rope = _rope_from_hf(hf)
        kind = rope.get("rope_scaling_type")
        if kind is not None and kind not in ROPE_SCALING_TYPES:
            raise ConfigError(
                f"config: rope_scaling type {kind!r} is not supported; falconet supports "
                f"{ROPE_SCALING_TYPES}"
            )
        if kind == "llama3" and any(rope.get(f"rope_{k}") is None for k in LLAMA3_KEYS[:2]):
            raise ConfigError(
                "config: llama3 rope_scaling needs low_freq_factor and high_freq_factor"
            )
        known = set(HF_KEYS) | set(READ_APART)
        return cls(
            **kwargs,
            **rope,
            eos_token_ids=eos_ids,
            torch_dtype=cls._hf_dtype(hf),
            extra={k: v for k, v in hf.items() if k not in known},
        )


def _json_float(value: Any) -> Any:
    """A number as transformers v5 writes non-finite floats into config.json
    (`{"__float__": "Infinity"}`, since JSON has no infinity); anything else unchanged."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        try:
            return float(value["__float__"])
        except (TypeError, ValueError):
            return value
    return value
