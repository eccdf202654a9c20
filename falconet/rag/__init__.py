"""Retrieval-augmented generation over the user's own documents.

`loaders` picks the files to index and reads them into plain text through the shared
reader (`falconet.documents`), `chunking` cuts that text into token-bounded passages with
offsets, `embed` turns passages into unit vectors (offline), and the store and ingestion
on top keep them in one SQLite file, exactly once per document version.
"""
