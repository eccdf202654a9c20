"""Falcon-Mamba configuration (Mamba-1): plain data with HF key names.

Falcon-Mamba-7B and Falcon3-Mamba-7B (TII, 2024) ship as transformers'
`FalconMambaForCausalLM` (model_type `falcon_mamba`). Their published config:

| model            | hidden | layers | expand | d_inner | state | conv | dt rank | vocab |
|------------------|--------|--------|--------|---------|-------|------|---------|-------|
| Falcon-Mamba-7B  | 4096   | 64     | 2      | 8192    | 16    | 4    | 256     | 65024 |

`time_step_rank` "auto" means ceil(hidden_size / 16), as transformers resolves it.

Source: transformers `models/falcon_mamba/configuration_falcon_mamba.py`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from falconet.errors import ConfigError
from falconet.models.falcon_config import HFConfigFile, _is_finite_number, _is_positive_int

FALCON_MAMBA_MODEL_TYPES = ("falcon_mamba",)
# Fields that must be positive integers.
SIZES = (
    "vocab_size",
    "hidden_size",
    "state_size",
    "num_hidden_layers",
    "expand",
    "conv_kernel",
)
FLAGS = ("use_bias", "use_conv_bias", "residual_in_fp32", "tie_word_embeddings")
# Fields read from (and written to) config.json under their own name.
HF_KEYS = (
    *SIZES,
    *FLAGS,
    "layer_norm_epsilon",
    "mixer_rms_eps",
    "hidden_act",
    "time_step_rank",
    "bos_token_id",
    "pad_token_id",
)
# The keys without which a config.json is not a Falcon-Mamba config: transformers' own
# defaults for them describe a 130M test model, not a checkpoint, so none is guessed.
REQUIRED_KEYS = ("vocab_size", "hidden_size", "state_size", "num_hidden_layers")
# The engine's default bound on prompt + completion tokens. Falcon-Mamba has no
# positions and its state does not grow, so nothing in the model limits the context;
# a bound still keeps a runaway request finite, and --max-context raises it.
DEFAULT_CONTEXT = 8192
# config.json keys read into other fields.
READ_APART = ("model_type", "eos_token_id", "torch_dtype", "dtype")


def recurrent_state_bytes(config, conv_bytes: int, ssm_bytes: int = 4) -> int:
    """Bytes of one sequence's recurrent state over all layers, whatever its length:
    `config.ssm_state_shapes()` per layer, conv inputs at `conv_bytes` each, the SSM
    state at `ssm_bytes` (fp32)."""
    conv, ssm = config.ssm_state_shapes()
    return config.num_hidden_layers * (math.prod(conv) * conv_bytes + math.prod(ssm) * ssm_bytes)


@dataclass(frozen=True)
class FalconMambaConfig(HFConfigFile):
    vocab_size: int = 65024
    hidden_size: int = 4096
    state_size: int = 16
    num_hidden_layers: int = 64
    layer_norm_epsilon: float = 1e-5
    expand: int = 2
    conv_kernel: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    # "auto" (ceil(hidden_size / 16)) or an int; always an int after construction
    time_step_rank: int | str = "auto"
    # eps of the weightless RMS norms on dt, B and C (Falcon-Mamba's addition to Mamba-1)
    mixer_rms_eps: float = 1e-6
    # transformers keeps the residual stream in fp32 between blocks (the default)
    residual_in_fp32: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (0,)
    pad_token_id: int | None = 0
    torch_dtype: str | None = None  # the checkpoint's dtype, used by dtype="auto"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()
        if self.time_step_rank == "auto":
            object.__setattr__(self, "time_step_rank", math.ceil(self.hidden_size / 16))

    # ---- derived values -------------------------------------------------------------
    @property
    def intermediate_size(self) -> int:
        """d_inner: the width the mixer's conv and scan run at (transformers' name)."""
        return self.expand * self.hidden_size

    @property
    def max_position_embeddings(self) -> int:
        """The context the faces default to (no positional limit: DEFAULT_CONTEXT)."""
        return DEFAULT_CONTEXT

    @property
    def variant(self) -> str:
        """A human name for the layout (never used to choose behaviour)."""
        head = "tied" if self.tie_word_embeddings else "untied"
        return (
            f"falcon-mamba (Mamba-1, d_inner {self.intermediate_size}, state {self.state_size}, "
            f"conv {self.conv_kernel}, dt rank {self.time_step_rank}, {head} head)"
        )

    def ssm_state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """One sequence's state of one layer: the last conv_kernel - 1 conv inputs per
        channel (d_inner, K - 1) and the SSM state (d_inner, state_size)."""
        E = self.intermediate_size
        return (E, self.conv_kernel - 1), (E, self.state_size)

    def state_bytes_per_sequence(self, conv_bytes: int, ssm_bytes: int = 4) -> int:
        return recurrent_state_bytes(self, conv_bytes, ssm_bytes)

    # ---- checks -----------------------------------------------------------------------
    def _validate(self) -> None:
        for name in SIZES:
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ConfigError(f"config: {name} must be a positive integer, got {value!r}")
        if self.conv_kernel < 2:
            raise ConfigError(
                f"config: conv_kernel must be at least 2 (a causal conv over past tokens), "
                f"got {self.conv_kernel}"
            )
        rank = self.time_step_rank
        if rank != "auto" and not _is_positive_int(rank):
            raise ConfigError(
                f'config: time_step_rank must be "auto" or a positive integer, got {rank!r}'
            )
        for name in FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"config: {name} must be true or false, got {getattr(self, name)!r}"
                )
        for name in ("layer_norm_epsilon", "mixer_rms_eps"):
            value = getattr(self, name)
            if not (_is_finite_number(value) and value > 0):
                raise ConfigError(f"config: {name} must be a positive number, got {value!r}")
        if self.hidden_act != "silu":
            # every Falcon-Mamba checkpoint uses silu, and the gate is silu whatever it says
            raise ConfigError(
                f"config: hidden_act {self.hidden_act!r} is not supported; Falcon-Mamba uses 'silu'"
            )
        self._check_token_ids()

    # ---- reading and writing HF config.json --------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> FalconMambaConfig:
        """Build from a HF `config.json` dict (`FalconMambaConfig` keys)."""
        cls._check_hf(
            hf,
            FALCON_MAMBA_MODEL_TYPES,
            "Falcon-Mamba",
            "falconet loads float Falcon-Mamba checkpoints",
        )
        missing = [k for k in REQUIRED_KEYS if hf.get(k) is None]
        if missing:
            raise ConfigError(
                f"config: no {missing[0]}; a Falcon-Mamba config.json must give "
                f"{', '.join(REQUIRED_KEYS)}"
            )
        defaults = cls.__dataclass_fields__
        kwargs: dict[str, Any] = {}
        for name in HF_KEYS:
            value = hf.get(name)
            kwargs[name] = defaults[name].default if value is None else value
        for name in ("bos_token_id", "pad_token_id"):
            if name in hf:  # an explicit null means "no token"
                kwargs[name] = hf[name]
        eos_ids = cls._eos_ids(hf, 0)
        known = set(HF_KEYS) | set(READ_APART)
        return cls(
            **kwargs,
            eos_token_ids=eos_ids,
            torch_dtype=cls._hf_dtype(hf),
            extra={k: v for k, v in hf.items() if k not in known},
        )

    def to_hf(self) -> dict[str, Any]:
        """The config as transformers' `FalconMambaConfig` writes it."""
        d = {k: v for k, v in asdict(self).items() if k in HF_KEYS}
        d["intermediate_size"] = self.intermediate_size
        d["eos_token_id"] = (
            self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        )
        d["model_type"] = "falcon_mamba"
        d["architectures"] = ["FalconMambaForCausalLM"]
        if self.torch_dtype:
            d["torch_dtype"] = self.torch_dtype
        return d
