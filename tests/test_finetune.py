"""`falconet finetune`: LoRA learns, merged == base + adapter, the PEFT folder loads in
peft + transformers, SIGKILL + --resume reproduces the run, packed examples never see each
other, labels cover exactly the assistant's tokens, bad lines are skipped by number."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import falconet
from falconet.models.adapters import AdapterError, read_peft_adapter, to_model_rows
from falconet.tokenizer import Tokenizer
from falconet.train.data import DataError
from falconet.train.finetune import Finetuner, FinetuneSettings, load_for_training
from falconet.train.sft_data import (
    IGNORE,
    INPUTS,
    LABELS,
    SEGMENTS,
    encode_example,
    pack,
    read_sft,
    read_sft_file,
)
from tests.conftest import (
    build_falcon_h1_hf_model,
    build_falcon_mamba_hf_model,
    build_hf_model,
    build_llama_hf_model,
    save_hf_model,
)

# A template in the ChatML manner over the test tokenizer's own special tokens.
TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'user' %}>>QUESTION<<{{ m.content }}\n"
    "{% elif m.role == 'assistant' %}>>ANSWER<<{{ m.content }}<|endoftext|>"
    "{% else %}>>DOMAIN<<{{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}>>ANSWER<<{% endif %}"
)
NAMES = ["fox", "dog", "falcon", "model", "word", "code", "number", "test"]


def _chat(rng: random.Random) -> dict:
    a, b = rng.choice(NAMES), rng.choice(NAMES)
    return {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"The {a} and the {b}?"},
            {"role": "assistant", "content": f"The {b} jumps over the {a}."},
        ]
    }


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))
    return path


def _with_template(folder: Path) -> Path:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Falcon-40B-layout model (grouped QKV: rows reordered at load) with a template."""
    return _with_template(save_hf_model(build_hf_model("40b"), tmp_path_factory.mktemp("base")))


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    rng = random.Random(0)
    return _write_jsonl(
        tmp_path_factory.mktemp("data") / "chat.jsonl", [_chat(rng) for _ in range(40)]
    )


def _settings(data: Path, model: Path, out: Path, **over) -> FinetuneSettings:
    kw = dict(data=[str(data)], model=str(model), out=str(out), lora=4, lora_alpha=8.0,
              lora_dropout=0.0, steps=30, lr=1e-2, warmup=2, block_size=96, batch_size=4,
              eval_every=1000, checkpoint_every=1000, seed=1)  # fmt: skip
    kw.update(over)
    return FinetuneSettings(**kw)


def _train_loss(t: Finetuner) -> float:
    """Mean loss per target token over the training rows."""
    saved = t.blocks.val
    t.blocks.val = t.blocks.train
    try:
        return t.evaluate()
    finally:
        t.blocks.val = saved


# ---- learning, merging, PEFT ------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(base, chat_data, tmp_path_factory):
    """One LoRA run published as a PEFT adapter, then (same weights) as a merged model."""
    tmp = tmp_path_factory.mktemp("lora")
    t = Finetuner(_settings(chat_data, base, tmp / "adapter", save_adapter=True, lora_dropout=0.1))
    t.prepare()
    before = _train_loss(t)
    final = t.run()
    after = _train_loss(t)
    t.model.eval()
    ids = t.blocks.train[0, INPUTS][:40].astype(np.int64).tolist()
    with torch.no_grad():
        unmerged = t.model(torch.tensor([ids]))[0]
    t.s.save_adapter, t.out = False, tmp / "merged"
    t.publish(final)
    return dict(before=before, after=after, adapter=tmp / "adapter", merged=tmp / "merged",
                ids=ids, unmerged=unmerged, final=final)  # fmt: skip


def test_lora_lowers_the_training_loss(lora_run):
    assert lora_run["after"] < 0.5 * lora_run["before"]
    assert lora_run["final"]["step"] == 30


def test_merged_model_equals_base_plus_adapter(lora_run, base):
    merged = falconet.load(lora_run["merged"]).logits(lora_run["ids"])
    assert torch.allclose(merged, lora_run["unmerged"], atol=1e-5, rtol=0)
    # and the adapter read back from its folder, applied by hand to the base weights
    adapter = read_peft_adapter(lora_run["adapter"])
    assert adapter.config["r"] == 4
    llm = falconet.load(base)
    model = llm.model
    layout_transforms = {"query_key_value"}  # 40b: fused QKV rows regrouped at load
    for module, m in adapter.modules.items():
        assert m.scaling == 8.0 / 4
        layer = model.get_submodule(module)
        transform = None
        if module.rsplit(".", 1)[-1] in layout_transforms:
            from falconet.models.falcon import regroup_qkv

            transform = lambda t: regroup_qkv(t, model.config)  # noqa: E731
        delta = to_model_rows(m.B, transform).float() @ m.A.float() * m.scaling
        layer.weight = torch.nn.Parameter(layer.weight + delta, requires_grad=False)
    by_hand = llm.logits(lora_run["ids"])
    assert torch.allclose(by_hand, merged, atol=1e-5, rtol=0)
    # and the adapter served on the base by falconet.load(adapter=)
    served = falconet.load(base, adapter=lora_run["adapter"]).logits(lora_run["ids"])
    assert torch.allclose(served, merged, atol=1e-5, rtol=0)
    assert not torch.allclose(falconet.load(base).logits(lora_run["ids"]), merged, atol=1e-2)


def test_adapter_loads_in_peft_with_equal_logits(lora_run, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = json.loads((lora_run["adapter"] / "adapter_config.json").read_text())["target_modules"]
    assert "transformer.h.0.self_attention.query_key_value" in names
    hf = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, lora_run["adapter"]).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor([lora_run["ids"]])).logits[0]
    ours = falconet.load(lora_run["merged"]).logits(lora_run["ids"])
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)
    # the merged folder is an ordinary HF folder too
    merged_hf = AutoModelForCausalLM.from_pretrained(lora_run["merged"], torch_dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(
            merged_hf(torch.tensor([lora_run["ids"]])).logits[0], theirs, atol=1e-4
        )


def test_a_malformed_adapter_folder_is_refused_by_name(lora_run, tmp_path):
    import shutil

    folder = shutil.copytree(lora_run["adapter"], tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA adapters are not supported"):
        read_peft_adapter(folder)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        read_peft_adapter(folder)


def test_resume_refuses_other_settings(base, chat_data, tmp_path):
    Finetuner(_settings(chat_data, base, tmp_path / "o", steps=2, checkpoint_every=1)).run()
    with pytest.raises(
        falconet.FalconetError, match="settings differ from the checkpoint's: lora$"
    ):
        Finetuner(
            _settings(chat_data, base, tmp_path / "o", steps=4, lora=2), resume=True
        ).prepare()
    other = _write_jsonl(
        tmp_path / "other.jsonl", chat_data.read_text().splitlines(keepends=True)[:-1]
    )
    with pytest.raises(falconet.FalconetError, match="the data differs"):
        Finetuner(_settings(other, base, tmp_path / "o", steps=4), resume=True).prepare()


def test_lora_targets_choose_the_layers(base, chat_data, tmp_path):
    t = Finetuner(
        _settings(
            chat_data, base, tmp_path / "o", lora_targets="dense_h_to_4h,*.0.self_attention.dense"
        )
    )
    t.prepare()
    trained = sorted(n for n, p in t.model.named_parameters() if p.requires_grad)
    assert trained == [
        "transformer.h.0.mlp.dense_h_to_4h.lora_A", "transformer.h.0.mlp.dense_h_to_4h.lora_B",
        "transformer.h.0.self_attention.dense.lora_A", "transformer.h.0.self_attention.dense.lora_B",
        "transformer.h.1.mlp.dense_h_to_4h.lora_A", "transformer.h.1.mlp.dense_h_to_4h.lora_B",
    ]  # fmt: skip
    with pytest.raises(falconet.FalconetError, match="matches no linear layer"):
        Finetuner(_settings(chat_data, base, tmp_path / "p", lora_targets="q_proj")).prepare()


def test_full_finetune_of_falcon3_learns_and_loads_in_transformers(chat_data, tmp_path):
    from transformers import AutoModelForCausalLM

    base = save_hf_model(build_llama_hf_model("falcon3_shape"), tmp_path / "base")
    t = Finetuner(_settings(chat_data, base, tmp_path / "out", lora=0, lr=3e-3, steps=20))
    t.prepare()
    before = _train_loss(t)
    t.run()
    assert _train_loss(t) < 0.5 * before
    ids = t.blocks.train[0, INPUTS][:30].astype(np.int64).tolist()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    assert torch.allclose(falconet.load(tmp_path / "out").logits(ids), theirs, atol=1e-4, rtol=0)


def test_prompt_loss_learns_every_token_and_holds_out_answers_only(base, chat_data, tmp_path):
    t = Finetuner(_settings(chat_data, base, tmp_path / "out", prompt_loss=True, eval_fraction=0.2))
    t.prepare()
    train, val = t.blocks.train, t.blocks.val
    assert np.array_equal(train[:, LABELS] != IGNORE, train[:, SEGMENTS] > 0)
    inside = val[:, SEGMENTS] > 0
    learned = val[:, LABELS] != IGNORE
    assert learned.any() and (inside & ~learned).any()  # held-out loss: the answers alone
    plain = Finetuner(_settings(chat_data, base, tmp_path / "o2", eval_fraction=0.2))
    plain.prepare()
    assert (plain.blocks.train[:, LABELS] != IGNORE).sum() < (train[:, LABELS] != IGNORE).sum()


# ---- a longer context -------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant,rope",
    [("7b", {"rope_theta": 80000.0}), ("7b", {"rope_scaling": "linear"}),
     ("llama", {"rope_theta": 5e5}), ("llama", {"rope_scaling": "linear"})],
)  # fmt: skip
def test_context_extension_trains_long_rows_and_transformers_reads_the_output(
    variant, rope, chat_data, tmp_path
):
    """A model with 32 positions, fine-tuned on 96-token rows with --context 128: its output
    says 128 positions and the new RoPE in config.json, and transformers' logits over 120
    tokens (past the old limit) equal falconet's."""
    from transformers import AutoModelForCausalLM

    build = build_llama_hf_model if variant == "llama" else build_hf_model
    base = save_hf_model(build("falcon3_shape" if variant == "llama" else variant,
                               max_position_embeddings=32), tmp_path / "base")  # fmt: skip
    tok_config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps(dict(tok_config, model_max_length=32)))
    t = Finetuner(_settings(chat_data, base, tmp_path / "out", lora=0, lr=3e-3, steps=4,
                            block_size=96, context=128, **rope))  # fmt: skip
    t.prepare()
    t.run()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["max_position_embeddings"] == 128
    tokenizer = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == 128
    params = config["rope_parameters"]
    if "rope_theta" in rope:
        assert params["rope_type"] == "default" and params["rope_theta"] == rope["rope_theta"]
    else:
        assert params["rope_type"] == "linear" and params["factor"] == 4.0
    ids = np.random.default_rng(0).integers(0, 100, 120).tolist()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    llm = falconet.load(tmp_path / "out", dtype="float32")
    assert llm.config.max_position_embeddings == 128
    assert torch.allclose(llm.logits(ids), theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "over,message",
    [({"context": 16}, "--context 16 is shorter than the model's (32 positions)"),
     ({"rope_theta": 1e5}, "--rope-theta and --rope-scaling need --context N"),
     ({"context": 64, "rope_scaling": "ntk"}, "--rope-scaling must be linear"),
     ({"context": -1}, "--context must be a number of positions")],
)  # fmt: skip
def test_a_bad_context_extension_is_refused(over, message, chat_data, tmp_path):
    base = save_hf_model(build_hf_model("7b", max_position_embeddings=32), tmp_path / "base")
    with pytest.raises(falconet.FalconetError, match=re.escape(message)):
        Finetuner(_settings(chat_data, base, tmp_path / "out", **over)).prepare()


def test_an_alibi_model_takes_no_rope_setting(chat_data, tmp_path):
    base = save_hf_model(build_hf_model("rw", max_position_embeddings=32), tmp_path / "base")
    with pytest.raises(falconet.FalconetError, match="uses ALiBi, not rotary"):
        Finetuner(_settings(chat_data, base, tmp_path / "out", context=64,
                            rope_theta=1e5)).prepare()  # fmt: skip


@pytest.mark.parametrize("arch", ["falcon_mamba", "falcon_h1"])
def test_recurrent_model_trains_one_example_per_row(arch, chat_data, tmp_path):
    hf = (
        build_falcon_mamba_hf_model("conv4_tied")
        if arch == "falcon_mamba"
        else build_falcon_h1_hf_model("gate_then_norm")
    )
    base = save_hf_model(hf, tmp_path / "base")
    logs: list[str] = []
    t = Finetuner(_settings(chat_data, base, tmp_path / "out", steps=20), log=logs.append)
    t.prepare()
    assert any("no packing" in m for m in logs)
    assert (t.blocks.train[:, SEGMENTS].max(axis=1) == 1).all()  # one example per row
    before = _train_loss(t)
    t.run()
    assert _train_loss(t) < 0.7 * before
    # the merged folder holds base + update for the recurrent layers too
    ids = t.blocks.train[0, INPUTS][:20].astype(np.int64).tolist()
    t.model.eval()
    assert torch.allclose(
        falconet.load(tmp_path / "out").logits(ids), t.model(torch.tensor([ids]))[0], atol=1e-4
    )


def test_bf16_autocast_and_an_eval_file(base, chat_data, tmp_path):
    rng = random.Random(7)
    held = _write_jsonl(tmp_path / "held.jsonl", [_chat(rng) for _ in range(6)])
    t = Finetuner(
        _settings(chat_data, base, tmp_path / "out", dtype="bfloat16", eval_data=str(held),
                  eval_every=10, steps=20, save_adapter=True)
    )  # fmt: skip
    t.prepare()
    assert len(t.blocks.val) >= 1 and t.n_examples == 40  # all 40 train, the file held out
    before = t.evaluate()
    final = t.run()
    assert final["val_loss"] < 0.7 * before
    assert [h["step"] for h in t.history if "val_loss" in h] == [10, 20]


# ---- packing and labels -----------------------------------------------------------------


@pytest.mark.parametrize("variant", ["rw", "7b", "40b", "llama"])
def test_packed_examples_compute_what_they_compute_alone(variant, tmp_path):
    hf = build_llama_hf_model("biases") if variant == "llama" else build_hf_model(variant)
    model, tokenizer, _ = load_for_training(save_hf_model(hf, tmp_path / "m"))
    rng = random.Random(3)
    examples = [encode_example(tokenizer, _chat(rng)["messages"]) for _ in range(5)]
    rows = pack(examples, 128, True, pad_id=0)
    assert rows.shape[0] < 5  # several examples share a row
    got = model.forward_segments(
        torch.from_numpy(rows[:, INPUTS].astype(np.int64)),
        torch.from_numpy(rows[:, SEGMENTS].astype(np.int64)),
    )
    checked = 0
    for r in range(rows.shape[0]):
        at = 0
        for seg in range(1, rows[r, SEGMENTS].max() + 1):
            n = int((rows[r, SEGMENTS] == seg).sum())
            alone = model(torch.from_numpy(rows[r, INPUTS, at : at + n].astype(np.int64))[None])[0]
            assert torch.allclose(got[r, at : at + n], alone, atol=1e-5, rtol=0)
            at, checked = at + n, checked + 1
    assert checked == 5


def test_labels_are_the_assistant_turns_and_nothing_else(base):
    tokenizer = Tokenizer.from_dir(base)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "The fox?"},
        {"role": "assistant", "content": "The dog."},
        {"role": "user", "content": "And the model?"},
        {"role": "assistant", "content": "The word."},
    ]
    e = encode_example(tokenizer, messages)
    assert tokenizer.decode(e.ids) == tokenizer.apply_chat_template(
        messages, add_generation_prompt=False
    )
    learned = tokenizer.decode([i for i, t in zip(e.ids, e.targets, strict=True) if t])
    assert learned == "The dog.<|endoftext|>The word.<|endoftext|>"
    rows = pack([e], 64, True, pad_id=0)
    labels = rows[0, LABELS]
    # each label is the next token where that token is a target, IGNORE everywhere else
    expected = [e.ids[i + 1] if e.targets[i + 1] else IGNORE for i in range(len(e.ids) - 1)]
    assert labels[: len(expected)].tolist() == expected
    assert (labels[len(expected) :] == IGNORE).all()


def test_without_a_template_eos_ends_the_answer(tmp_path):
    folder = save_hf_model(build_hf_model("7b"), tmp_path / "m")  # no chat template
    tokenizer = Tokenizer.from_dir(folder)
    e = encode_example(
        tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    )
    learned = tokenizer.decode([i for i, t in zip(e.ids, e.targets, strict=True) if t])
    assert learned == " Hello\n<|endoftext|>"  # the fallback writes "Falcon: Hello\n"


# ---- bad data ---------------------------------------------------------------------------

GOOD = {"prompt": "The fox?", "completion": "The dog."}
BAD_LINES = {
    "invalid JSON": ('{"messages": [', "not a JSON line"),
    "missing role": ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages[0] has no role"),
    "unknown role": ({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "role 'bot'"),
    "empty assistant turn": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "messages[1] is an empty assistant turn"),
    "no assistant turn": ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    "over-long example": ({"prompt": "The fox? " * 40, "completion": "The dog."}, "longer than --block-size 64"),
    "neither shape": ({"text": "hello"}, 'expected {"messages"'),
    "content not text": ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "content must be a string"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_line_is_skipped_with_its_number(case, base, tmp_path):
    bad, reason = BAD_LINES[case]
    line = bad if isinstance(bad, str) else json.dumps(bad)
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, line + "\n", GOOD])
    data = read_sft_file(path, Tokenizer.from_dir(base), block_size=64)
    assert len(data.examples) == 3 and data.total == 4
    assert len(data.skipped) == 1
    assert data.skipped[0].startswith(f"{path}:3: ") and reason in data.skipped[0]


def test_only_bad_lines_is_a_data_error(base, tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ["nope\n", {"text": "x"}])
    with pytest.raises(
        DataError, match=r"no usable example .* 2 lines, 2 skipped \(first: .*d.jsonl:1: not a JSON"
    ):
        read_sft([path], Tokenizer.from_dir(base), block_size=64)


def test_cli_reports_skipped_lines_and_trains(base, chat_data, tmp_path):
    lines = chat_data.read_text().splitlines(keepends=True)
    data = _write_jsonl(tmp_path / "d.jsonl", lines[:10] + ["{broken\n"] + lines[10:20])
    res = subprocess.run(
        [sys.executable, "-m", "falconet", "finetune", str(data), "--model", str(base), "--out",
         str(tmp_path / "out"), "--lora", "2", "--steps", "2", "--block-size", "64", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert f"skipped 1 of 21 examples: {data}:11: not a JSON line" in res.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "falconet", "finetune", str(data), "--model", str(base), "--out",
         str(tmp_path / "o2"), "--save-adapter"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert (
        bad.returncode == 2
        and bad.stderr.strip() == "falconet: error: --save-adapter needs --lora RANK"
    )


# ---- kill and resume --------------------------------------------------------------------


def _cmd(data: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "falconet", "finetune", str(data), "--model", str(base), "--out", str(out),
            "--lora", "4", "--lora-dropout", "0.1", "--save-adapter", "--steps", "40", "--lr", "1e-2",
            "--warmup", "2", "--block-size", "96", "--batch-size", "4", "--eval-every", "20",
            "--checkpoint-every", "5", "--seed", "2", "--threads", "1", *extra]  # fmt: skip


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_matches_uninterrupted_run(base, chat_data, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_cmd(chat_data, base, straight), check=True, capture_output=True, timeout=300)
    ref = _history(Path(f"{straight}.run"))

    killed = tmp_path / "killed"
    ckpt = Path(f"{killed}.run") / "checkpoint.pt"
    proc = subprocess.Popen(
        _cmd(chat_data, base, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    step_at_kill = torch.load(ckpt, weights_only=True)["step"]
    assert 5 <= step_at_kill < 40
    assert not killed.exists()

    res = subprocess.run(
        _cmd(chat_data, base, killed, "--resume"), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    resumed = _history(Path(f"{killed}.run"))
    assert [h["step"] for h in resumed] == list(range(1, 41))
    assert [h["loss"] for h in resumed] == [h["loss"] for h in ref]
    assert resumed[-1]["val_loss"] == ref[-1]["val_loss"]
    assert (killed / "adapter_model.safetensors").read_bytes() == (
        straight / "adapter_model.safetensors"
    ).read_bytes()
    # the checkpoint holds only what learns: LoRA's A and B, not the base weights
    saved = torch.load(ckpt, weights_only=True)["trainable"]
    assert saved and all(n.endswith((".lora_A", ".lora_B")) for n in saved)
