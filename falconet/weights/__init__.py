"""Storage: checkpoint containers read and written without knowing an architecture.

hf.py reads Hugging Face folders (safetensors, legacy .bin) against a `CheckpointLayout`
the model file provides; gguf.py reads and writes llama.cpp's GGUF container; gguf_vocab.py
is a byte-level BPE tokenizer as GGUF metadata. What each architecture's files hold is
the models layer's business (models/checkpoint.py).
"""
