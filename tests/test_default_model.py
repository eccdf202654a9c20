"""The embedded default model, falconet-tiny: shipped, small, HF-loadable, sensible."""

from __future__ import annotations

import json

import torch

import falconet
from falconet.llm import DEFAULT_MODEL_DIR
from tests.conftest import assert_matches_transformers


def test_ships_inside_the_package_within_25_mb():
    files = {p.name: p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md"} <= set(files)  # fmt: skip
    assert sum(files.values()) <= 25 * 2**20
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "falcon" and config["multi_query"] and config["parallel_attn"]


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
