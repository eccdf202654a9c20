"""Pieces the model files share: attention (masks, rotary, ALiBi, SDPA), the static KV
cache of the dense path, and `Linear` (narrow-dtype weights, row-invariant kernel).
Nothing here knows which architecture it serves: configs are read through small
protocols (`attention.AttentionConfig`, `cache.CacheConfig`)."""
