"""POST /v1/embeddings through a real `falconet serve --embedding-model DIR --rag-store`
process, with the official `openai` client and raw httpx: vectors equal
sentence-transformers' own `encode` of the same texts (the packaged all-MiniLM-L6-v2,
copied to a folder of another name, offline), for text and token-id inputs, in float and
base64, batched; RAG embeds with the same model."""

from __future__ import annotations

import base64
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from sentence_transformers import SentenceTransformer

from falconet.rag.embed import packaged_model_path
from falconet.rag.stores import open_store
from tests.server_tools import ServerProcess

T = 120
NAME = "bible-embedder"  # the copied folder's name: the model's name on the wire
TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And God said, Let there be light: and there was light.",
    "Blessed are the meek: for they shall inherit the earth.",
    "Wisdom hath builded her house, she hath hewn out her seven pillars.",
    "x",
    "Émile a vu trois chats — 三只猫 — sur le toit.",
]


def _copy_model(to) -> None:
    """The packaged model under another name; hard links where the file system allows."""

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(packaged_model_path(), to, copy_function=link)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("embeddings")
    _copy_model(base / NAME)
    proc = ServerProcess("--embedding-model", str(base / NAME), "--rag-store",
                         str(base / "store"), env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        yield {"server": proc.wait_ready(), "model": base / NAME, "store": base / "store"}
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(env) -> openai.OpenAI:
    url = env["server"].url
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=T, max_retries=0)


@pytest.fixture(scope="module")
def reference(env) -> SentenceTransformer:
    return SentenceTransformer(str(env["model"]), device="cpu", local_files_only=True)


def cosines(got, want) -> np.ndarray:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)


def test_embeddings_equal_sentence_transformers(client, reference):
    want = reference.encode(TEXTS, normalize_embeddings=True)
    # the client asks for base64 by default and decodes little-endian float32 with numpy
    r = client.embeddings.create(model=NAME, input=TEXTS)
    assert r.model == NAME and r.object == "list"
    assert [d.index for d in r.data] == list(range(len(TEXTS)))
    got = np.array([d.embedding for d in r.data])
    assert got.shape == (len(TEXTS), reference.get_embedding_dimension())
    assert cosines(got, want).min() > 0.9999
    assert np.allclose(np.linalg.norm(got, axis=-1), 1, atol=1e-5)  # unit vectors
    tokens = [len(reference.tokenizer(t)["input_ids"]) for t in TEXTS]  # special ones too
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(tokens)

    floats = client.embeddings.create(model=NAME, input=TEXTS, encoding_format="float")
    assert np.array([d.embedding for d in floats.data]).tolist() == got.tolist()  # same floats
    one = client.embeddings.create(model=NAME, input=TEXTS[0], dimensions=got.shape[1])
    assert len(one.data) == 1 and cosines(one.data[0].embedding, want[0]) > 0.9999


def test_token_id_inputs(client, reference):
    """Token ids of the embedding model's own vocabulary, framed by its special tokens
    as a text's are: the same vectors as the texts they spell."""
    want = reference.encode(TEXTS[:3], normalize_embeddings=True)
    ids = [reference.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:3]]
    r = client.embeddings.create(model=NAME, input=ids)
    assert cosines([d.embedding for d in r.data], want).min() > 0.9999
    assert r.usage.prompt_tokens == sum(len(x) + 2 for x in ids)  # + [CLS] and [SEP]
    one = client.embeddings.create(model=NAME, input=ids[1], encoding_format="float")
    assert cosines(one.data[0].embedding, want[1]) > 0.9999


def test_raw_http_shape_and_base64(env, reference):
    url = env["server"].url
    body = {"input": TEXTS[:2], "encoding_format": "base64"}  # no model: the served one
    r = httpx.post(f"{url}/v1/embeddings", json=body, timeout=T)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"object", "data", "model", "usage"} and out["model"] == NAME
    assert set(out["usage"]) == {"prompt_tokens", "total_tokens"}
    for d, w in zip(out["data"], reference.encode(TEXTS[:2], normalize_embeddings=True),
                    strict=True):  # fmt: skip
        assert set(d) == {"object", "index", "embedding"} and d["object"] == "embedding"
        raw = base64.b64decode(d["embedding"])
        assert len(raw) == 4 * w.shape[0]
        assert cosines(np.frombuffer(raw, dtype="<f4"), w) > 0.9999


def test_batches_equal_single_inputs(client, reference):
    """More inputs than one call to the shared embedder takes, sent concurrently: each
    vector is the one its text gets alone."""
    texts = [f"{t} ({i})" for i, t in enumerate(TEXTS * 7)]  # 42 inputs, 3 embedder calls
    want = reference.encode(texts, normalize_embeddings=True)
    with ThreadPoolExecutor(3) as pool:
        batches = list(pool.map(lambda _: client.embeddings.create(model=NAME, input=texts),
                                range(3)))  # fmt: skip
    alone = [client.embeddings.create(model=NAME, input=t).data[0].embedding for t in texts[:4]]
    for r in batches:
        got = [d.embedding for d in r.data]
        assert cosines(got, want).min() > 0.9999
        assert cosines(got[:4], alone).min() > 0.9999


def test_refusals_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=NAME, input="x", dimensions=64)
    assert e.value.body["param"] == "dimensions" and "384" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=NAME, input="word " * 300)
    assert e.value.body["code"] == "context_length_exceeded" and "256" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert NAME in e.value.body["message"]


def test_rag_embeds_with_the_same_model(env):
    """The RAG store records the embedder it was filled with: the --embedding-model one."""
    url = env["server"].url
    files = {"file": ("light.txt", b"And God said, Let there be light.\n", "text/plain")}
    r = httpx.post(f"{url}/v1/rag/documents", files=files, timeout=T)
    assert r.status_code == 200, r.text
    body = {"query": "light", "mode": "vector", "answer": False}
    hits = httpx.post(f"{url}/v1/rag/query", json=body, timeout=T).json()["sources"]
    assert "light" in hits[0]["text"]
    with open_store(env["store"], create=False) as store:
        assert store.embedder_id.startswith(f"{NAME}@")
    assert httpx.get(f"{url}/health", timeout=T).json() == {"status": "ok"}
