"""`falconet batch run --ray ADDRESS` on a real local Ray cluster (`ray start --head`, 2
CPUs, started by the test): 1,000 records scored by 2 Ray actors through the PostgreSQL
ledger, one actor SIGKILLed mid-job; the job still ends with exactly one result per valid
record, byte for byte those of an uninterrupted local run at temperature 0, and the same
rejects."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import assert_cli_error
from tests.crash_tools import CRASH_ENV
from tests.pg_tools import new_schema, schema_url
from tests.test_batch_crash import BAD_EVERY, RECORDS, job_argv, write_input
from tests.test_batch_postgres import finished_rows

ray = pytest.importorskip("ray", reason="the Ray tests need falconet[ray]")

REPO = Path(__file__).resolve().parents[1]
SCORING_ACTOR = "ray::MapWorker(MapBatches(ScoringWorker))"  # the actors' process title
# The cluster and its driver share a token of their own: Ray's token auth otherwise reads
# (or a local ray.init writes) ~/.ray/auth_token, which this test must not depend on.
RAY_ENV = {**CRASH_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(node: subprocess.Popen, temp: str) -> None:
    """Stop a `ray start --block` process (it stops what it started) and drop its temp dir."""
    node.send_signal(signal.SIGTERM)
    try:
        node.wait(timeout=60)
    except subprocess.TimeoutExpired:
        node.kill()
        node.wait()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_address():
    """A one-node Ray cluster of 2 CPUs in a temp dir; its address. `ray start --block`
    stops the processes it started when it is terminated."""
    port = _free_port()
    # Short: Ray's unix sockets live under the temp dir, and their paths have a limit.
    temp = tempfile.mkdtemp(prefix="fr", dir="/tmp")
    env = {
        **RAY_ENV,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    head = subprocess.Popen(
        [Path(sys.executable).with_name("ray"), "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}",
         "--object-store-memory=100000000"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, "ray start --head exited"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the Ray head did not open its port"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(head, temp)


def scoring_actors() -> list[int]:
    """The pids of the processes whose title names a scoring actor."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:  # gone meanwhile
                continue
            if title.startswith(SCORING_ACTOR):
                pids.append(int(entry.name))
    return pids


def test_ray_job_with_a_worker_killed_equals_an_uninterrupted_local_run(
    tmp_path, tiny_7b, pg_url, ray_address
):
    keys = write_input(tmp_path / "in.jsonl")
    (tmp_path / "p.txt").write_text("Note: {{ text }}\nLabel:")
    url = schema_url(pg_url, new_schema())
    bad = RECORDS // BAD_EVERY + 1
    argv = [sys.executable, "-m", "falconet",
            *job_argv(tiny_7b, tmp_path / "ray" / "out.jsonl", "--ledger", url,
                      "--ray", ray_address, "--ray-workers", "2")]  # fmt: skip
    log = (tmp_path / "ray.log").open("w")
    job = subprocess.Popen(argv, cwd=tmp_path, env=RAY_ENV, stdout=log, stderr=log)
    try:
        # Kill an actor once results are being committed (the bad lines are finished at
        # intake), while most records are still to score.
        deadline = time.monotonic() + 900
        while (finished := finished_rows(url)) <= bad:
            assert job.poll() is None, (tmp_path / "ray.log").read_text()
            assert time.monotonic() < deadline, "no record was scored"
            time.sleep(0.05)
        victims = scoring_actors()
        assert victims, "no scoring actor found"
        os.kill(victims[0], signal.SIGKILL)
        assert finished < RECORDS + bad, "the job ended before the kill"
        assert job.wait(timeout=900) == 0, (tmp_path / "ray.log").read_text()
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        log.close()
    summary = (tmp_path / "ray.log").read_text().splitlines()[-1]
    assert summary == f"{RECORDS} done, {bad} rejected, 0 pending, 0 duplicates skipped"
    local = [sys.executable, "-m", "falconet", *job_argv(tiny_7b, tmp_path / "clean" / "out.jsonl")]
    clean = subprocess.run(local, cwd=tmp_path, env=CRASH_ENV, capture_output=True, text=True,
                           timeout=900)  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    done = tmp_path / "ray" / "out.jsonl"
    results = [json.loads(line) for line in done.read_text().splitlines()]
    assert sorted(r["key"] for r in results) == sorted(keys)  # each valid record once
    assert done.read_bytes() == (tmp_path / "clean" / "out.jsonl").read_bytes()
    rejects = tmp_path / "ray" / "out.rejects.jsonl"
    assert rejects.read_bytes() == (tmp_path / "clean" / "out.rejects.jsonl").read_bytes()
    assert len(rejects.read_text().splitlines()) == bad


@pytest.mark.parametrize(
    "extra,needle",
    [
        (("--follow",), "--follow is not supported with --ray yet"),
        (("--ray-workers", "0"), "--ray-workers must be at least 1, got 0"),
    ],
)
def test_cli_ray_usage_errors_are_one_line(tmp_path, tiny_7b, extra, needle):
    write_input(tmp_path / "in.jsonl")
    (tmp_path / "p.txt").write_text("{{ text }}")
    argv = job_argv(tiny_7b, tmp_path / "out.jsonl", "--ray", "127.0.0.1:9", *extra)
    res = subprocess.run([sys.executable, "-m", "falconet", *argv], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert_cli_error(res, needle)


def _alive_nodes(address: str) -> int:
    probe = (f"import ray; ray.init(address={address!r}, log_to_driver=False); "
             "print(sum(n['Alive'] for n in ray.nodes()))")  # fmt: skip
    res = subprocess.run([sys.executable, "-c", probe], env=RAY_ENV, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    return int(res.stdout.split()[-1]) if res.returncode == 0 and res.stdout.split() else 0


def test_an_sqlite_ledger_is_refused_on_a_cluster_of_several_machines(
    ray_address, tmp_path, tiny_7b
):
    """A second node at another address (127.0.0.2, a loopback address of its own) joins
    the cluster: the SQLite ledger, a file on this machine, is refused by name before any
    record is read. (Last in the module: the node leaves the cluster at the end.)"""
    temp = tempfile.mkdtemp(prefix="fr2", dir="/tmp")
    node = subprocess.Popen(
        [Path(sys.executable).with_name("ray"), "start", "--block", f"--address={ray_address}",
         "--node-ip-address=127.0.0.2", "--num-cpus=1", "--disable-usage-stats",
         f"--temp-dir={temp}", "--object-store-memory=80000000"],
        env=RAY_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while _alive_nodes(ray_address) < 2:
            assert node.poll() is None, "ray start (the second node) exited"
            assert time.monotonic() < deadline, "the second node did not join"
            time.sleep(1)
        write_input(tmp_path / "in.jsonl")
        (tmp_path / "p.txt").write_text("{{ text }}")
        argv = job_argv(tiny_7b, tmp_path / "out.jsonl", "--ray", ray_address)
        res = subprocess.run([sys.executable, "-m", "falconet", *argv], cwd=tmp_path,
                             env=RAY_ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert_cli_error(res, "cluster has nodes on 127.0.0.2 that cannot share it")
        assert "--ledger postgresql://" in res.stderr
        assert not (tmp_path / "out.jsonl").exists()
    finally:
        _stop(node, temp)
