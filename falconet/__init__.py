"""falconet: run the Falcon family of LLMs on your own hardware, exactly and fast.

import falconet
llm = falconet.load("path/to/falcon")      # HF folder; None = the embedded default model
llm.generate("The capital of France is", max_tokens=16)
"""

from falconet.errors import (
    CheckpointError,
    ConfigError,
    FalconetError,
    GenerationError,
    TokenizerError,
)
from falconet.llm import LLM, load
from falconet.models.falcon_config import FalconConfig
from falconet.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CheckpointError",
    "ConfigError",
    "FalconConfig",
    "FalconetError",
    "GenerationError",
    "SamplingParams",
    "TokenizerError",
    "load",
]
