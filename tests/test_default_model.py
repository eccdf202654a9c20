"""The embedded models: falconet-tiny (shipped, small, HF-loadable, sensible) and its
answering sibling falconet-tiny-instruct (2,048 positions, answers from its sources)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import falconet
from falconet.llm import ANSWER_MODEL_DIR, DEFAULT_MODEL_DIR
from tests.conftest import assert_matches_transformers, script_module

# The answering model's exact-fact and citation accuracy on the test's 100 held-out
# questions must not fall below these floors, set from its measurement there: 0.37 and
# 0.93 (README, "falconet-tiny-instruct"; 0.335 and 0.89 on the training run's 200).
EXACT_FACT_FLOOR = 0.28
CITATION_FLOOR = 0.85


def test_both_ship_inside_the_package_within_40_mb():
    total = 0
    for folder in (DEFAULT_MODEL_DIR, ANSWER_MODEL_DIR):
        files = {p.name: p.stat().st_size for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json", "README.md"} <= set(files)  # fmt: skip
        total += sum(files.values())
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "falcon" and config["multi_query"]
    package = sum(p.stat().st_size for p in Path(falconet.__file__).parent.rglob("*") if p.is_file()
                  and "__pycache__" not in p.parts and p.suffix not in (".so", ".pyd"))  # fmt: skip
    assert total <= 30 * 2**20 and package <= 40 * 2**20
    answering = json.loads((ANSWER_MODEL_DIR / "config.json").read_text())
    assert answering["max_position_embeddings"] == 2048


def test_declares_its_family_and_licence():
    """falconet-tiny ships with falconet, under falconet's Apache-2.0: its model card says so."""
    card = falconet.load().card
    assert card.family == "Falcon 7B-style multi-query"
    assert (card.licence.id, card.licence.source) == ("apache-2.0", "README.md front matter")


def test_loads_in_transformers_with_equal_logits():
    assert_matches_transformers(DEFAULT_MODEL_DIR, "And God said unto Moses, I AM THAT I AM")


def test_has_learned_its_corpus():
    """Held-out-style check: a familiar verse is far more likely than its words shuffled."""
    llm = falconet.load()
    verse = "In the beginning God created the heaven and the earth."
    shuffled = "earth the heaven In and God the created beginning the."

    def mean_nll(text: str) -> float:
        ids = [llm.tokenizer.eos_token_id, *llm.tokenizer.encode(text)]
        logp = torch.log_softmax(llm.logits(ids)[:-1], dim=-1)
        return -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item()

    assert mean_nll(verse) < mean_nll(shuffled) - 1.0


def test_answering_model_loads_in_transformers_with_equal_logits():
    """Over a prompt longer than falconet-tiny's 256 positions: the raised RoPE base is
    read the same way by both."""
    assert_matches_transformers(ANSWER_MODEL_DIR, "The tenant shall pay the rent. " * 60)


def test_answering_model_finds_the_fact_in_its_sources(tmp_path):
    """100 held-out questions over 100 generated documents (fact values and phrasings
    that training never saw), asked as `falconet rag ask` asks them: ingest, hybrid
    search for 5 passages, the numbered prompt, a greedy answer. Not timed."""
    sft, evaluation = script_module("make_rag_sft"), script_module("eval_rag_answers")
    data = tmp_path / "data"
    sft.main(["--out", str(data), "--seed", "11", "--train-docs", "10", "--heldout-docs", "100"])
    rows, context = evaluation.evaluate(data, str(ANSWER_MODEL_DIR), limit=100, k=5)
    result = evaluation.summary(rows)
    assert context == 2048 and result["questions"] == 100
    assert result["sources_seen_mean"] == 5  # the context holds five passages whole
    assert result["exact_fact"] >= EXACT_FACT_FLOOR, result
    assert result["citation"] >= CITATION_FLOOR, result


def test_embedded_models_load_by_name_where_no_such_path_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert falconet.load("falconet-tiny-instruct").path == ANSWER_MODEL_DIR
    assert falconet.load("falconet-tiny").config.max_position_embeddings == 256
    (tmp_path / "falconet-tiny").mkdir()  # a folder of that name wins, as a path
    with pytest.raises(falconet.FalconetError, match="falconet-tiny"):
        falconet.load("falconet-tiny")
