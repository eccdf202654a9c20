"""`falconet batch`: records through a sandboxed template and the engine, results equal to
`llm.generate` at temperature 0, bad records rejected with reasons while the run goes
on, the ledger's exactly-once bookkeeping (duplicates, resumes, an output file torn or
changed behind its back), --follow on a growing file, --schema through structured
output. The SIGKILL test is in test_batch_crash.py."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import falconet
from falconet.batch import BatchJob, BatchSettings, open_ledger
from falconet.batch.ledger import Emitted
from falconet.batch.records import Cursor, read_lines
from falconet.errors import BatchError
from falconet.sampling import SamplingParams
from tests.conftest import assert_cli_error

TEMPLATE = "Note {{ id }}: {{ text }}\nSummary:"
PARAMS = SamplingParams(max_tokens=5, temperature=0.0)


@pytest.fixture(scope="module")
def llm(tiny_7b):
    return falconet.load(tiny_7b)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_at(request, tmp_path) -> str:
    """Where a test's job keeps its ledger: the default file beside the results, or a
    schema of its own on the test PostgreSQL server (the ledger tests run on both)."""
    if request.param == "sqlite":
        return str(tmp_path / "out.jsonl.ledger")
    from tests.pg_tools import new_schema, schema_url

    return schema_url(request.getfixturevalue("pg_url"), new_schema())


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def records(n: int, start: int = 0) -> list[dict]:
    return [
        {"id": i, "text": f"the quick brown fox {i} " * (1 + i % 4)}
        for i in range(start, start + n)
    ]


def run_job(llm, tmp_path: Path, **over) -> tuple[list[dict], list[dict]]:
    settings = BatchSettings(
        **{"input": tmp_path / "in.jsonl", "template": TEMPLATE, "out": tmp_path / "out.jsonl",
           "params": PARAMS, "key_field": "id", "max_batch": 4, **over}
    )  # fmt: skip
    job = BatchJob(llm, settings)
    try:
        job.run()
    finally:
        job.close()
    return read_jsonl(settings.out), read_jsonl(settings.rejects_path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_results_equal_llm_generate_in_input_order(llm, tmp_path):
    rows = records(13)
    write_jsonl(tmp_path / "in.jsonl", rows)
    results, rejects = run_job(llm, tmp_path)
    assert rejects == []
    assert [r["key"] for r in results] == [str(r["id"]) for r in rows]
    for r, out in zip(rows, results, strict=True):
        prompt = f"Note {r['id']}: {r['text']}\nSummary:"
        assert out["text"] == llm.generate(prompt, max_tokens=5, temperature=0.0)
        assert out["source"] == f"in.jsonl:{r['id'] + 1}"
        assert out["finish_reason"] in ("stop", "length") and 1 <= out["completion_tokens"] <= 5


def test_bad_records_are_rejected_with_reasons_and_the_run_goes_on(llm, tmp_path):
    long_text = "fox jumps " * 1500  # ~3000 tokens: over the 2048-token context
    rows = [
        {"id": 1, "text": "fine"},
        "not json at all",
        "[1, 2, 3]",
        '"a string"',
        {"text": "no id"},
        {"id": [1], "text": "a list as key"},
        {"id": 2},  # the template names text, which it lacks
        {"id": 3, "text": long_text},
        {"id": 4, "text": "x" * 25000},  # over --max-record-bytes
        "",  # a blank line is no record
        {"id": 5, "text": "also fine"},
        "[" * 15000,  # deeper than Python's json parser goes
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    with path.open("ab") as f:
        f.write(b'{"id": 6, "text": "caf\xe9"}\n{"id": 7, "text": "cut')  # Latin-1; truncated
    results, rejects = run_job(llm, tmp_path, max_record_bytes=20000)
    assert [r["key"] for r in results] == ["1", "5"]
    reasons = {r["source"]: r["reason"] for r in rejects}
    assert list(reasons) == [f"in.jsonl:{n}" for n in (2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14)]
    assert reasons["in.jsonl:2"].startswith("invalid JSON: Expecting value")
    assert reasons["in.jsonl:3"] == "the record is a JSON array, not an object"
    assert reasons["in.jsonl:4"] == "the record is a JSON string, not an object"
    assert reasons["in.jsonl:5"] == "the record has no field 'id' (--key)"
    assert "key field 'id' is a JSON array" in reasons["in.jsonl:6"]
    assert reasons["in.jsonl:7"] == "template error: 'text' is undefined"
    assert "tokens; with --max-tokens 5 the model's context of 2048" in reasons["in.jsonl:8"]
    assert "over the limit of 20000 (--max-record-bytes)" in reasons["in.jsonl:9"]
    assert reasons["in.jsonl:12"] == "invalid JSON: nested too deeply"
    assert reasons["in.jsonl:13"] == "the line is not UTF-8 text (at byte offset 22)"
    assert "the file's last line has no newline: truncated?" in reasons["in.jsonl:14"]
    assert rejects[1]["excerpt"] == "[1, 2, 3]"
    with open_ledger(tmp_path / "out.jsonl.ledger") as ledger:
        assert ledger.counts() == {"pending": 0, "done": 2, "rejected": 11, "duplicates": 0}


def test_the_sandbox_keeps_records_data_and_templates_out_of_python(llm, tmp_path):
    hostile = [
        {"id": 1, "text": "{{ 7 * 7 }} {% for x in range(3) %}loop{% endfor %}"},
        {"id": 2, "text": "{{ ''.__class__.__mro__[1].__subclasses__() }}"},
        {"id": 3, "text": "}}{{ cycler.__init__.__globals__.os.system('touch pwned') }}"},
    ]
    write_jsonl(tmp_path / "in.jsonl", hostile)
    results, rejects = run_job(llm, tmp_path)
    assert rejects == [] and len(results) == 3
    # A field is data: the prompt holds its characters, not what they would compute.
    prompt = f"Note 1: {hostile[0]['text']}\nSummary:"
    assert results[0]["text"] == llm.generate(prompt, max_tokens=5, temperature=0.0)
    assert not (tmp_path / "pwned").exists()
    # A template reaching for Python internals rejects each record; the job still ends.
    for n, template in enumerate(
        [
            "{{ text.__class__.__mro__ }}",
            "{{ record.update({'id': 0}) }}",
            "{{ lipsum.__globals__['os'] }}",
        ]  # fmt: skip
    ):
        out = tmp_path / f"out{n}.jsonl"
        results, rejects = run_job(llm, tmp_path, template=template, out=out)
        assert results == [] and len(rejects) == 3
        assert all(r["reason"].startswith("template refused by the sandbox") for r in rejects)


def test_restart_scores_only_new_records_and_skips_duplicates(llm, tmp_path, ledger_at):
    path = write_jsonl(tmp_path / "in.jsonl", records(6))
    first, _ = run_job(llm, tmp_path, ledger=ledger_at)
    with path.open("a") as f:  # two new records, a duplicate id and a bad line
        f.write("".join(json.dumps(r) + "\n" for r in [*records(2, 6), records(1, 3)[0]]))
        f.write("{oops\n")
    second, rejects = run_job(llm, tmp_path, ledger=ledger_at)
    assert second[:6] == first
    assert [r["key"] for r in second] == [str(i) for i in range(8)]
    assert [r["source"] for r in rejects] == ["in.jsonl:10"]
    with open_ledger(ledger_at) as ledger:
        assert ledger.counts() == {"pending": 0, "done": 8, "rejected": 1, "duplicates": 1}
    # Without --key a record's key is its content: the same object reordered is a duplicate.
    write_jsonl(tmp_path / "in2.jsonl", ['{"a": 1, "b": "x"}', '{"b": "x",  "a": 1}'])
    results, _ = run_job(llm, tmp_path, input=tmp_path / "in2.jsonl", out=tmp_path / "o2.jsonl",
                         key_field=None, template="{{ b }}")  # fmt: skip
    assert len(results) == 1 and len(results[0]["key"]) == 64


def test_a_torn_or_unrecorded_append_is_repaired_never_repeated(llm, tmp_path, ledger_at):
    write_jsonl(tmp_path / "in.jsonl", [*records(5), "bad"])
    run_job(llm, tmp_path, ledger=ledger_at)
    out, rejects = tmp_path / "out.jsonl", tmp_path / "out.rejects.jsonl"
    whole, whole_rejects = out.read_bytes(), rejects.read_bytes()
    # As if killed after appending (the last line torn) but before recording the append.
    with open_ledger(ledger_at) as ledger:
        ledger.mark_emitted(Emitted(1, {"results": len(whole.split(b"\n")[0]) + 1, "rejects": 0}))
    out.write_bytes(whole[: len(whole) - 9])
    run_job(llm, tmp_path, ledger=ledger_at)
    assert out.read_bytes() == whole and rejects.read_bytes() == whole_rejects
    # A line falconet did not write is not cut away: the job refuses to go on.
    with open_ledger(ledger_at) as ledger:
        ledger.mark_emitted(Emitted(1, {"results": len(whole.split(b"\n")[0]) + 1, "rejects": 0}))
    out.write_bytes(whole.replace(b'"key": "3"', b'"key": "X"'))
    with pytest.raises(BatchError, match="that this job did not write"):
        run_job(llm, tmp_path, ledger=ledger_at)
    out.write_bytes(whole[:10])
    with pytest.raises(BatchError, match="changed outside falconet"):
        run_job(llm, tmp_path, ledger=ledger_at)


def test_a_ledger_resumes_only_its_own_job(llm, tmp_path, ledger_at):
    write_jsonl(tmp_path / "in.jsonl", records(2))
    run_job(llm, tmp_path, ledger=ledger_at)
    with pytest.raises(BatchError, match="another prompt template; resume it with the same"):
        run_job(llm, tmp_path, ledger=ledger_at, template="{{ text }}")
    with pytest.raises(BatchError, match="another sampling"):
        run_job(llm, tmp_path, ledger=ledger_at, params=SamplingParams(max_tokens=6))
    (tmp_path / "notledger").write_text("hello")
    with pytest.raises(BatchError, match="not a readable batch ledger"):
        run_job(llm, tmp_path, ledger=str(tmp_path / "notledger"))


def test_follow_waits_for_a_line_to_end_and_for_new_files(llm, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    part = folder / "a.jsonl"
    part.write_text(json.dumps(records(1)[0]) + "\n" + '{"id": 1, "te')
    assert [line.number for line in read_lines(part, "a.jsonl", Cursor(), 1000, True, 10)] == [1]
    settings = BatchSettings(folder, TEMPLATE, tmp_path / "out.jsonl", params=PARAMS,
                             key_field="id", follow=True, max_batch=4, poll_every=0.05)  # fmt: skip
    job = BatchJob(llm, settings)
    stop = threading.Event()
    runner = threading.Thread(target=job.run, kwargs={"should_stop": stop.is_set})
    runner.start()
    try:
        wait_for_lines(settings.out, 1)
        with part.open("a") as f:  # the writer finishes its line
            f.write('xt": "second"}\n')
        (folder / ".b.jsonl.part").write_text(json.dumps(records(1, 2)[0]) + "\n")
        wait_for_lines(settings.out, 2)
        (folder / ".b.jsonl.part").rename(folder / "b.jsonl")
        wait_for_lines(settings.out, 3)
    finally:
        stop.set()
        runner.join(timeout=60)
        job.close()
    results = read_jsonl(settings.out)
    assert [(r["key"], r["source"]) for r in results] == [
        ("0", "a.jsonl:1"), ("1", "a.jsonl:2"), ("2", "b.jsonl:1")]  # fmt: skip
    assert not (tmp_path / "out.rejects.jsonl").exists()


def wait_for_lines(path: Path, n: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not path.exists() or path.read_text().count("\n") < n:
        assert time.monotonic() < end, f"{path} never reached {n} lines"
        time.sleep(0.02)


def test_schema_output_is_parsed_json_or_a_reject(llm, tmp_path):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}},
              "required": ["ok"], "additionalProperties": False}  # fmt: skip
    write_jsonl(tmp_path / "in.jsonl", records(3))
    results, rejects = run_job(llm, tmp_path, schema=schema,
                               params=SamplingParams(max_tokens=12))  # fmt: skip
    assert len(results) + len(rejects) == 3
    for r in results:
        assert r["finish_reason"] == "stop"
        assert json.loads(r["text"]) == r["json"] and set(r["json"]) == {"ok"}
    short, rejects = run_job(llm, tmp_path, schema=schema, out=tmp_path / "short.jsonl",
                             params=SamplingParams(max_tokens=2))  # fmt: skip
    assert short == [] and len(rejects) == 3
    assert all(
        "reached --max-tokens 2 before its JSON was complete" in r["reason"] for r in rejects
    )
    with pytest.raises(BatchError, match="the --schema is not"):
        run_job(llm, tmp_path, schema={"type": "no-such-type"}, out=tmp_path / "x.jsonl")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "falconet", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)  # fmt: skip


def test_cli_runs_a_job_and_reports(tiny_7b, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [*records(3), "[]"])
    (tmp_path / "p.txt").write_text(TEMPLATE)
    args = ["batch", "run", "--input", "in.jsonl", "--prompt", "p.txt", "--out", "o.jsonl",
            "--key", "id", "-m", str(tiny_7b), "--max-tokens", "4"]  # fmt: skip
    res = cli(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "3 done, 1 rejected, 0 pending, 0 duplicates skipped\n"
    assert "falconet batch: 0 of 4 records finished before this run" in res.stderr
    assert "rec/s" in res.stderr or "s/rec" in res.stderr
    assert len(read_jsonl(tmp_path / "o.jsonl")) == 3
    again = cli(*args, cwd=tmp_path)
    assert again.stdout == res.stdout and (tmp_path / "o.jsonl").read_text().count("\n") == 3


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--input", "missing.jsonl"], "missing.jsonl: no such input file or folder"),
        (["--prompt", "bad.txt"], "--prompt bad.txt: line 1: Expected an expression"),
        (["--schema", "p.txt"], "--schema p.txt: not JSON"),
        (["--max-batch", "0"], "--max-batch must be at least 1"),
        (["--temperature", "-1"], "'temperature' must be"),
    ],
)
def test_cli_errors_are_one_line(tiny_7b, tmp_path, extra, needle):
    write_jsonl(tmp_path / "in.jsonl", records(1))
    (tmp_path / "p.txt").write_text(TEMPLATE)
    (tmp_path / "bad.txt").write_text("{{ }}}")
    options = {"--input": "in.jsonl", "--prompt": "p.txt", "--out": "o.jsonl"}
    options.update(zip(extra[::2], extra[1::2], strict=True))
    args = [x for option in options.items() for x in option]
    assert_cli_error(cli("batch", "run", *args, "-m", str(tiny_7b), cwd=tmp_path), needle)
