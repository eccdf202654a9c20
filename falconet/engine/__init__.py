"""The engine: continuous batching for every face (CLI, Python API, server, RAG).

It owns the running sequences and their per-sequence model state (paged KV blocks, or
SSM slots for a recurrent model: state.py), decides each step's work, runs the model and
samples. Faces `submit` token ids with `SamplingParams` and read `Delta`s from a
`Stream`; nothing above this package touches the model's forward pass or its state.
"""

from falconet.engine.engine import Delta, Engine, EngineStats, QueueFull, Stream

__all__ = ["Delta", "Engine", "EngineStats", "QueueFull", "Stream"]
