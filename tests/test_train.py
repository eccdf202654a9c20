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

from falconet.errors import FalconetError
from falconet.train.data import DataError
from falconet.train.trainer import Trainer, TrainSettings
from tests.conftest import assert_matches_transformers

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
    (d / "records.jsonl").write_bytes(
        b'\xef\xbb\xbf{"text": "a JSONL record with a byte order mark"}\n\n'
    )
    (d / ".hidden").mkdir()
    (d / ".hidden" / "secret.txt").write_text("never trained on")
    return d


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


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


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_matches_uninterrupted_run(corpus, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(corpus, straight), check=True, capture_output=True, timeout=300)
    ref = _history(Path(f"{straight}.run"))

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
    resumed = _history(Path(f"{killed}.run"))
    assert [h["step"] for h in resumed] == list(range(1, 61))  # no step lost or repeated
    assert abs(resumed[59]["loss"] - ref[59]["loss"]) <= 1e-6
    assert abs(resumed[59]["val_loss"] - ref[59]["val_loss"]) <= 1e-6
    # on this machine and thread count the whole run is reproduced bit for bit
    assert (killed / "model.safetensors").read_bytes() == (
        straight / "model.safetensors"
    ).read_bytes()
    assert _leftovers(tmp_path) == [] and _leftovers(Path(f"{killed}.run")) == []


@pytest.mark.parametrize("variant", ["7b", "40b", "11b", "rw"])
def test_output_loads_in_transformers_with_equal_logits(corpus, tmp_path, variant):
    out = tmp_path / variant
    Trainer(small(corpus, out, steps=3, variant=variant, heads=4, kv_heads=2)).run()
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", "generation_config.json", "README.md"}  # fmt: skip
    assert_matches_transformers(out, "And God said, Let there be light 🦅 東京")


def test_resume_with_other_settings_is_refused(corpus, tmp_path):
    Trainer(small(corpus, tmp_path / "o", steps=2, checkpoint_every=1)).run()
    with pytest.raises(FalconetError, match="hidden_size"):
        Trainer(small(corpus, tmp_path / "o", steps=4, hidden_size=32), resume=True).run()


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda d: (d / "empty.txt").write_text("  \n"), "no text found"),
        (
            lambda d: (d / "bin.txt").write_bytes(b"\x00\x01\x02" * 100),
            r"1 skipped \(.*bin\.txt looks binary",
        ),
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


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


def test_corpus_reading(corpus):
    from falconet.train.data import read_corpus

    docs = read_corpus([corpus]).documents
    assert "Falcon & friends" in docs and "var x" not in "".join(docs)  # visible HTML text only
    assert "a JSONL record with a byte order mark" in docs
    assert not any("never trained on" in d for d in docs)  # hidden folders are skipped
    assert not any(d.startswith("\ufeff") for d in docs)


def test_corpus_reading_through_the_shared_reader(tmp_path):
    from falconet.train.data import read_corpus

    d = tmp_path / "data"
    (d / "b").mkdir(parents=True)
    (d / "a.txt").write_bytes("caf\u00e9 in cp1252".encode("cp1252"))
    (d / "b" / "guide.rst").write_text("Guide\n=====\n")
    records = '{"text": "UTF-16 record \u6771\u4eac"}\r\n{"text": "one\u2028line"}\r\n'
    (d / "c.jsonl").write_bytes(records.encode("utf-16"))
    (d / "d.html").write_text("<h1>Kept</h1><script>var lost = 1;")
    (d / "e.txt").write_text(" \n")
    os.mkfifo(d / "f.txt")
    (tmp_path / "notes.csv").write_text("x;y\r\n")  # named on its own: read as plain text
    logs: list[str] = []
    corpus = read_corpus([d, tmp_path / "notes.csv"], warn=logs.append)
    # Sorted paths (b/guide.rst between a.txt and c.jsonl), decoded as rag decodes them.
    from_jsonl = ["UTF-16 record 東京", "one\u2028line"]  # not split at U+2028
    assert corpus.documents == ["café in cp1252", "Guide\n=====\n", *from_jsonl, "Kept", "x;y\n"]
    assert corpus.skipped == [
        (d / "e.txt", f"{d / 'e.txt'} is empty (no text in it)"),
        (d / "f.txt", f"{d / 'f.txt'} is not a regular file"),
    ]
    assert logs == [f"{d / 'd.html'}: an unclosed <script> hides the rest of the page"]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    from falconet.train.trainer import lr_at

    s = TrainSettings(data=[], out="/tmp/x", steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, s) == pytest.approx(1e-4)
    assert lr_at(9, s) == pytest.approx(1e-3)
    assert lr_at(10, s) == pytest.approx(1e-3)
    assert lr_at(99, s) == pytest.approx(1e-4)  # the last step sits on the floor
    assert all(lr_at(i, s) >= lr_at(i + 1, s) for i in range(10, 99))


def test_gradient_accumulation_equals_one_big_batch(corpus, tmp_path):
    big = Trainer(small(corpus, tmp_path / "a", batch_size=8, steps=3))
    acc = Trainer(small(corpus, tmp_path / "b", batch_size=4, grad_accum=2, steps=3))
    for t in (big, acc):
        t.prepare()
        for _ in range(3):
            t.train_step()
    for p, q in zip(big.model.parameters(), acc.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def test_existing_output_or_run_is_never_overwritten_silently(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FalconetError, match="already exists"):
        Trainer(small(corpus, out, steps=2)).run()
    assert (out / "notes.txt").read_text() == "mine"
    Trainer(small(corpus, tmp_path / "m", steps=2, checkpoint_every=1)).run()
    with pytest.raises(FalconetError, match="holds a run; pass --resume"):
        Trainer(small(corpus, tmp_path / "m", steps=4), overwrite=True).run()
    with pytest.raises(FalconetError, match="must not contain one another"):
        Trainer(small(corpus, tmp_path / "n", run_dir=str(tmp_path / "n" / "run"))).run()
    with pytest.raises(FalconetError, match="must not contain one another"):
        Trainer(small(corpus, corpus / "model")).run()
    with pytest.raises(FalconetError, match="must name a new folder"):
        small(corpus, Path("/"))


def test_resume_checks_steps_checkpoint_and_corpus(corpus, tmp_path):
    s = small(corpus, tmp_path / "o", steps=4, checkpoint_every=2)
    Trainer(s).run()
    with pytest.raises(FalconetError, match="past --steps 2"):
        Trainer(small(corpus, tmp_path / "o2", run_dir=s.run_dir, steps=2), resume=True).run()
    data2 = tmp_path / "data2"
    data2.mkdir()
    for f in corpus.iterdir():
        if f.is_file():
            (data2 / f.name).write_bytes(f.read_bytes())
    (data2 / "extra.txt").write_text("a new file changes the data")
    with pytest.raises(FalconetError, match="corpus differs"):
        Trainer(small(data2, tmp_path / "o3", run_dir=s.run_dir, steps=6), resume=True).run()
    (Path(s.run_dir) / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FalconetError, match="not a falconet checkpoint"):
        Trainer(small(corpus, tmp_path / "o4", run_dir=s.run_dir, steps=6), resume=True).run()


def test_no_held_out_set_means_no_held_out_loss(corpus, tmp_path):
    final = Trainer(small(corpus, tmp_path / "o", steps=2, val_fraction=0.0, eval_every=1)).run()
    assert "val_loss" not in final
    assert "perplexity" not in (tmp_path / "o" / "README.md").read_text()
