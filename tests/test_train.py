"""`falconet train`: learning, exact kill-and-resume, HF-loadable output, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import falconet
from falconet.errors import FalconetError
from falconet.train.data import DataError
from falconet.train.trainer import Trainer, TrainSettings

TEXT = (Path(__file__).parent / "conftest.py").read_text() + (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
    "And God said, Let there be light: and there was light. And God saw the light, that it was good.\n"
) * 30


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text(TEXT[: len(TEXT) // 2])
    (d / "b.md").write_text(TEXT[len(TEXT) // 2 :])
    (d / "page.html").write_text(
        "<html><script>var x=1;</script><p>Falcon &amp; friends</p></html>"
    )
    (d / "blob.txt").write_bytes(bytes(range(256)) * 4)  # binary: skipped with a warning
    return d


def small(corpus: Path, out: Path, **over) -> TrainSettings:
    kw = dict(data=[str(corpus)], out=str(out), vocab_size=400, hidden_size=64, layers=2, heads=4,
              block_size=32, batch_size=8, steps=50, lr=3e-3, warmup=5, eval_every=1000,
              checkpoint_every=1000, seed=3)  # fmt: skip
    kw.update(over)
    return TrainSettings(**kw)


def test_fifty_steps_lower_held_out_loss(corpus, tmp_path):
    logs: list[str] = []
    t = Trainer(small(corpus, tmp_path / "out"), log=logs.append)
    t.prepare()
    before = t.evaluate()
    final = t.run()
    assert final["step"] == 50
    assert final["val_loss"] < before - 1.0
    assert any("blob.txt" in m for m in logs)  # the binary file was skipped, by name
    history = [
        json.loads(line)
        for line in (tmp_path / "out.run" / "history.jsonl").read_text().splitlines()
    ]
    assert [h["step"] for h in history] == list(range(1, 51))


def _train_cmd(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "falconet", "train", str(corpus), "--out", str(out), "--vocab-size", "400",
            "--hidden", "64", "--layers", "2", "--heads", "4", "--block-size", "32", "--batch-size", "8",
            "--steps", "60", "--warmup", "5", "--lr", "3e-3", "--eval-every", "30", "--checkpoint-every", "10",
            "--seed", "5", "--threads", "1", *extra]  # fmt: skip


def _losses(run_dir: Path) -> dict[int, float]:
    return {
        h["step"]: h["loss"]
        for h in map(json.loads, (run_dir / "history.jsonl").read_text().splitlines())
    }


def test_sigkill_then_resume_matches_uninterrupted_run(corpus, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(corpus, straight), check=True, capture_output=True, timeout=300)
    ref = _losses(Path(f"{straight}.run"))

    killed = tmp_path / "killed"
    ckpt = Path(f"{killed}.run") / "checkpoint.pt"
    proc = subprocess.Popen(
        _train_cmd(corpus, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    step_at_kill = torch.load(ckpt, weights_only=True)["step"]
    assert 10 <= step_at_kill < 60
    assert not killed.exists()  # the final folder is only published at the end

    res = subprocess.run(
        _train_cmd(corpus, killed, "--resume"), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    resumed = _losses(Path(f"{killed}.run"))
    assert sorted(resumed) == list(range(1, 61))
    assert abs(resumed[60] - ref[60]) <= 1e-6
    assert resumed[30] == pytest.approx(ref[30], abs=1e-6)


@pytest.mark.parametrize("variant", ["7b", "40b", "11b", "rw"])
def test_output_loads_in_transformers_with_equal_logits(corpus, tmp_path, variant):
    from transformers import FalconForCausalLM, PreTrainedTokenizerFast

    out = tmp_path / variant
    Trainer(small(corpus, out, steps=3, variant=variant, heads=4, kv_heads=2)).run()
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", "generation_config.json", "README.md"}  # fmt: skip
    llm = falconet.load(out, dtype="float32")
    hf = FalconForCausalLM.from_pretrained(out).eval()
    hf_tok = PreTrainedTokenizerFast.from_pretrained(out)
    text = "And God said, Let there be light 🦅 東京"
    ids = llm.tokenizer.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (llm.logits(ids) - ref).abs().max().item() <= 1e-4


def test_resume_with_other_settings_is_refused(corpus, tmp_path):
    Trainer(small(corpus, tmp_path / "o", steps=2, checkpoint_every=1)).run()
    with pytest.raises(FalconetError, match="hidden_size"):
        Trainer(small(corpus, tmp_path / "o", steps=4, hidden_size=32), resume=True).run()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda d: (d / "empty.txt").write_text("  \n"), "no text found"),
        (lambda d: (d / "bin.txt").write_bytes(b"\x00\x01\x02" * 100), "1 binary or non-UTF-8"),
        (lambda d: (d / "short.txt").write_text("just a few words"), "too few for two blocks"),
        (
            lambda d: (d / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n'),
            'string "text" field',
        ),
        (
            lambda d: (d / "torn.jsonl").write_text('{"text": "ok"}\n{"text": "cut'),
            "not a JSON line",
        ),
    ],
)
def test_bad_corpus_gives_clear_error_and_writes_nothing(tmp_path, make, error):
    data = tmp_path / "data"
    data.mkdir()
    make(data)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=error):
        Trainer(small(data, out, block_size=64)).run()
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_unwritable_output_fails_before_training(corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FalconetError, match="cannot be written"):
        Trainer(small(corpus, blocker / "out")).run()


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--hidden", "65"], "multiple of --heads"),
        (["--steps", "0"], "--steps"),
        (["--variant", "llama"], "invalid choice"),
        (["--lr", "nan"], "--lr"),
        (["--block-size", "100000"], "too few for two blocks"),
    ],
)
def test_cli_errors_exit_2_with_one_line(corpus, tmp_path, flags, needle):
    res = subprocess.run([sys.executable, "-m", "falconet", "train", str(corpus), "--out", str(tmp_path / "o"),
                          "--vocab-size", "300", *flags], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("falconet: error:")]
    assert len(errors) == 1 and needle in errors[0], res.stderr
    assert not (tmp_path / "o").exists()
