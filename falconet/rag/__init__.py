"""Retrieval-augmented generation over the user's own documents.

`loaders` turns files into plain text, `chunking` cuts that text into token-bounded
passages with offsets, `embed` turns passages into unit vectors (offline), and the store
and ingestion on top keep them in one SQLite file, exactly once per document version.
"""
