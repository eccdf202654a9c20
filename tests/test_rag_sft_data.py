"""scripts/make_rag_sft.py (synthetic RAG fine-tuning data) and the scoring of
scripts/eval_rag_answers.py: the data is the same for the same seed, train and held-out
share no fact value and no phrasing, every example cites a passage that holds its answer,
its user turn is the prompt `rag ask` builds from the same passages, and its passages are
the chunks ingestion makes of the same document."""

from __future__ import annotations

import json
import re

import pytest

import falconet
from falconet.rag.answer import build_prompt, flatten
from falconet.rag.embed import default_embedder
from tests.conftest import script_module

sft = script_module("make_rag_sft")
evaluation = script_module("eval_rag_answers")
templates = script_module("rag_sft_templates")


@pytest.fixture(scope="module")
def count_tokens():
    return default_embedder().count_tokens


@pytest.fixture(scope="module")
def splits(count_tokens):
    return {s: sft.build_split(7, s, 20, [5], count_tokens) for s in sft.SPLITS}


def test_the_same_seed_writes_the_same_files(tmp_path):
    outs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / name
        assert sft.main(["--out", str(out), "--seed", str(seed), "--train-docs", "10",
                         "--heldout-docs", "10"]) == 0  # fmt: skip
        outs.append({p.relative_to(out).as_posix(): p.read_bytes()
                     for p in sorted(out.rglob("*")) if p.is_file()})  # fmt: skip
    a, b, c = outs
    assert a == b
    assert a["train.jsonl"] != c["train.jsonl"]
    assert len([p for p in a if p.startswith("heldout_docs/")]) == 10
    manifest = json.loads(a["manifest.json"])
    assert manifest["heldout"]["documents"] == 10 and manifest["train"]["examples"] > 0
    lines = a["train.jsonl"].decode().splitlines()
    assert len(lines) == manifest["train"]["examples"]
    for line in lines:
        roles = [m["role"] for m in json.loads(line)["messages"]]
        assert roles == ["user", "assistant"]
    questions = [json.loads(x) for x in a["heldout_questions.jsonl"].decode().splitlines()]
    assert {q["kind"] for q in questions} == set(templates.KINDS)
    for q in questions:  # each expected fact is in its document's file
        assert q["fact"] in a[f"heldout_docs/{q['doc']}"].decode()


def test_splits_share_no_fact_and_no_phrasing(splits):
    values = {s: {v for d in docs for v in (*d.facts.values(), d.anchor)}
              for s, (docs, _, _) in splits.items()}  # fmt: skip
    assert values["train"] and values["heldout"]
    assert not values["train"] & values["heldout"]
    for split, (docs, questions, _) in splits.items():
        assert all(sft.split_of(v) == split for v in values[split])
        for q in questions:
            allowed = sft.phrasings(templates.KINDS[q.doc.kind]["questions"][q.field], split)
            assert q.text in {t.format(a=q.doc.anchor) for t in allowed}
        for d in docs:
            for field, variants in templates.KINDS[d.kind]["facts"].items():
                others = {k: v for k, v in d.facts.items() if k != field}
                used = {t.format(v=d.facts[field], a=d.anchor, **others) for t in variants}
                allowed = {t.format(v=d.facts[field], a=d.anchor, **others)
                           for t in sft.phrasings(variants, split)}  # fmt: skip
                assert d.sentences[field] in allowed and d.sentences[field] in d.text
                assert used - allowed  # the other split's phrasings exist and are not used
    for kind in templates.KINDS.values():
        for variants in [kind["intro"], *kind["facts"].values(), *kind["questions"].values()]:
            train, held = sft.phrasings(variants, "train"), sft.phrasings(variants, "heldout")
            assert train and held and not set(train) & set(held)
            assert train + held == variants


def test_more_questions_join_training_only(count_tokens, splits):
    """--more-questions: training asks in the extra phrasings too, none of them a held-out
    phrasing, and the held-out split is the same as without them."""
    more = script_module("rag_sft_more_questions").MORE_QUESTIONS
    assert set(more) == set(templates.KINDS)
    for kind, spec in templates.KINDS.items():
        assert set(more[kind]) == set(spec["questions"])
        for field, variants in spec["questions"].items():
            assert more[kind][field] and not set(more[kind][field]) & set(variants)
    train = sft.build_split(7, "train", 20, [5], count_tokens, more_questions=True)
    extra = {t.format(a=q.doc.anchor) for q in train[1] for t in more[q.doc.kind][q.field]}
    assert any(q.text in extra for q in train[1])
    for q in train[1]:
        allowed = sft.phrasings(templates.KINDS[q.doc.kind]["questions"][q.field], "train")
        own = {t.format(a=q.doc.anchor) for t in allowed + more[q.doc.kind][q.field]}
        assert q.text in own
    held = sft.build_split(7, "heldout", 20, [5], count_tokens, more_questions=True)
    assert [q.text for q in held[1]] == [q.text for q in splits["heldout"][1]]
    assert [e.as_json() for e in held[2]] == [e.as_json() for e in splits["heldout"][2]]


def _passages(user: str) -> dict[int, str]:
    """The numbered passages of a prompt's user turn: n -> the text after the label."""
    found = re.findall(r"^\[(\d+)\] \((.*?)\) (.*)$", user, re.M)
    return {int(n): text for n, _, text in found}


def test_every_example_cites_a_passage_holding_its_fact(splits):
    for _, questions, examples in splits.values():
        assert len(examples) >= 0.9 * len(questions)
        for ex in examples:
            user, assistant = (m["content"] for m in ex.messages)
            passages = _passages(user)
            assert sorted(passages) == list(range(1, 6))  # five passages, numbered [1]..[5]
            cited = {int(n) for n in re.findall(r"\[(\d+)\]", assistant)}
            assert cited == {ex.cited}
            assert ex.question.fact in passages[ex.cited] and ex.question.fact in assistant
            quote = re.search(r'"(.*)"$', assistant).group(1)
            assert quote in passages[ex.cited]  # the answer quotes the passage
            # the other passages do not hold the answer
            assert [n for n, t in passages.items() if ex.question.fact in t] == [ex.cited]
            assert user.endswith(f"Question: {ex.question.text}")


def test_passage_counts_in_turn_and_the_first_share(count_tokens, splits):
    """--passages 5,1,2 gives the questions 5, 1 and 2 passages in turn; --first-share 1
    puts every answering passage first, as search ranks the best; by default it moves."""
    _, _, examples = sft.build_split(7, "train", 20, [5, 1, 2], count_tokens, first_share=1.0)
    counts = [len(e.hits) for e in examples]
    assert set(counts) == {5, 1, 2} and counts[:3] == [5, 1, 2]
    assert all(e.cited == 1 for e in examples)
    assert {e.cited for e in splits["train"][2]} == {1, 2, 3, 4, 5}


def test_the_user_turn_is_the_prompt_rag_ask_builds(splits):
    llm = falconet.load()
    tok = llm.tokenizer
    for _, _, examples in splits.values():
        for ex in examples[:: max(1, len(examples) // 12)]:
            ids, sources = build_prompt(tok, ex.question.text, ex.hits, 1 << 20, 64)
            text = tok.apply_chat_template(ex.messages[:1], add_generation_prompt=True)
            assert ids == tok.encode(text, add_special_tokens=False)
            assert [s.hit for s in sources] == ex.hits


def test_passages_are_the_chunks_ingestion_makes(tmp_path, splits, count_tokens):
    from falconet.rag.ingest import ingest
    from falconet.rag.stores import open_store

    docs = splits["heldout"][0][:5]
    for d in docs:
        (tmp_path / d.name).write_text(d.text, encoding="utf-8")
    with open_store(tmp_path / "store") as store:
        ingest(store, [tmp_path / d.name for d in docs], default_embedder())
        for d in docs:
            stored = store.document(str(tmp_path / d.name))
            texts = [text for _, text in store.chunk_texts(stored.id)]
            assert texts == [h.text for h in sft.passages(d, count_tokens)]


def test_scoring_on_hand_made_answers():
    assert evaluation.normalize("  The Rent: $1,250.00! ") == "the rent 1 250 00"
    has = evaluation.has_fact
    assert has("The monthly rent is $1,250.00 [2].", "$1,250.00")
    assert has("the rent is 1,250.00", "$1,250.00")  # the sign is punctuation
    assert not has("The rent is $11,250.00 [2].", "$1,250.00")  # whole words only
    assert not has("The rent is 1250 dollars.", "$1,250.00")
    assert has("It is led by MAYA OKAFOR.", "Maya Okafor")
    assert not has("notice of 160 days", "60 days")
    assert not has("anything", "")
    assert evaluation.citations("as [2] and [10] say, not [x]") == {2, 10}
    passages = {1: "The deposit is $500.00.", 2: "The rent is $1,250.00 a month.", 3: "Pets."}
    s = evaluation.score("q", "$1,250.00", "The rent is $1,250.00 [2].", passages)
    assert (s.exact, s.citation, s.in_prompt, s.retrieved, s.sources_seen) == (True, True, True,
                                                                              True, 3)  # fmt: skip
    s = evaluation.score("q", "$1,250.00", "The rent is $1,250.00 [1].", passages)
    assert (s.exact, s.citation, s.retrieved) == (True, False, True)
    s = evaluation.score("q", "$1,250.00", "It says so [2].", passages)
    assert (s.exact, s.citation) == (False, True)
    s = evaluation.score("q", "$9.00", "The rent is $9.00 [2].", passages)
    assert (s.exact, s.citation, s.in_prompt, s.retrieved) == (True, False, False, False)
    # retrieved whole, but cut out of what the model saw
    s = evaluation.score("q", "$9.00", "no idea", passages, ["Rent: $9.00.", "Pets."])
    assert (s.in_prompt, s.retrieved) == (False, True)
    rows = [evaluation.score("q", "$1,250.00", a, passages, full=n)
            for a, n in (("$1,250.00 [2]", 100), ("no idea", 300))]  # fmt: skip
    got = evaluation.summary(rows)
    assert got["exact_fact"] == 0.5 and got["citation"] == 0.5 and got["retrieved"] == 1.0
    assert got["in_prompt"] == 1.0 and got["sources_seen_mean"] == 3
    assert got["full_prompt_tokens_mean"] == 200 and got["full_prompt_tokens_max"] == 300
    assert flatten(" a\n\n b ") == "a b"
