"""The `falconet` command line: one module per command group (generate/chat, serve,
info/convert, train, perplexity, rag), the flags they share in `common`, dispatch in `main`.
This is a face: it drives the public API (`falconet.load`) and the engine, and is the
only place that prints and exits."""

from falconet.cli.main import main

__all__ = ["main"]
