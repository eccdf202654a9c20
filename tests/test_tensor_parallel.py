"""Tensor parallelism on 2 gloo ranks (falconet/parallel/): each Falcon style -- 7B
(multi-query), 40B (grouped kv heads, two norms), 11B (grouped, one norm, untied head),
falcon-rw (ALiBi: each rank's heads keep their slopes; 6 heads, so rank 1's include the
slopes past the largest power of two), Falcon3 (Llama), Falcon-Mamba (each rank its
share of the inner channels and of the recurrent state) and Falcon-H1 (attention and
Mamba-2 heads side by side) -- gives the logits and greedy tokens of one process, through `LLM` and
through `falconet serve --tp 2` with the official openai client; bad head counts fail
before any worker starts; a killed worker takes the server down; a rank holds about half
the model."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch

import falconet
from falconet.parallel import TensorParallelError
from falconet.sampling import SamplingParams
from tests.conftest import (
    FALCON_H1_VARIANTS,
    build_falcon_h1_hf_model,
    build_falcon_mamba_hf_model,
    build_hf_model,
    build_llama_hf_model,
    save_hf_model,
)
from tests.server_tools import ServerProcess
from tests.test_ternary import build_bitnet_model

# Falcon variant (tests/conftest.py VARIANTS) or llama:<LLAMA_VARIANTS name>
STYLES = {
    "7b": "7b",
    "40b": "40b",
    "11b": "11b",
    "rw": "rw_6heads",
    "falcon3": "llama:falcon3_shape",
}
REPO = Path(__file__).resolve().parents[1]
PROMPTS = [list(range(20 + i, 26 + 3 * i)) for i in range(8)]  # 8 prompts, 6..27 tokens


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    out = {}
    for style, variant in STYLES.items():
        if variant.startswith("llama:"):
            model = build_llama_hf_model(variant.removeprefix("llama:"))
        else:
            model = build_hf_model(variant)
        out[style] = (model, save_hf_model(model, tmp_path_factory.mktemp(style)))
    return out


def _workers() -> list[psutil.Process]:
    """falconet's worker processes under this one (not multiprocessing's resource tracker)."""
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if "resource_tracker" not in " ".join(p.cmdline())
    ]


def assert_tp_equals_one_process(one, two, hf_model) -> None:
    """fp32 logits of `two` (tensor-parallel) within 1e-5 of `one` (one process) and 1e-4
    of transformers'; greedy tokens equal, for 8 prompts sharing steps and alone."""
    ids = list(range(30, 59))
    expected, got = one.logits(ids).cpu(), two.logits(ids).cpu()  # (from a GPU too)
    assert got.shape == expected.shape == (len(ids), one.config.vocab_size)
    assert (got - expected).abs().max().item() <= 1e-5
    with torch.no_grad():
        hf = hf_model(torch.tensor([ids])).logits[0].float()
    assert (got - hf).abs().max().item() <= 1e-4
    greedy = SamplingParams(max_tokens=10, ignore_eos=True)
    solo = [one.complete([p], greedy)[0].token_ids for p in PROMPTS]
    assert [c.token_ids for c in two.complete(PROMPTS, greedy)] == solo
    assert two.complete([PROMPTS[3]], greedy)[0].token_ids == solo[3]


def served_tp2_texts(model: Path) -> list[str]:
    """`falconet serve --model model --tp 2`: the streamed text of each of PROMPTS, sent as
    8 concurrent requests with the official openai client (greedy, 10 tokens); the
    server stops cleanly on SIGTERM."""
    args = ("--model", str(model), "--tp", "2", "--dtype", "float32", "--max-batch", "8",
            "--served-model-name", "m")  # fmt: skip
    with ServerProcess(*args) as server:
        client = server.openai_client(timeout=120)
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda p: _stream_text(client, p), PROMPTS))
    assert server.proc.returncode == 0
    return [text for text, _ in together]


def assert_served_tp2_equals_one_process(model: Path) -> None:
    """`served_tp2_texts` equal one process's greedy completions of PROMPTS (the server
    stops at end-of-text, as one process does without ignore_eos)."""
    one = falconet.load(model, dtype="float32")
    expected = [c.text for c in one.complete(PROMPTS, SamplingParams(max_tokens=10))]
    assert served_tp2_texts(model) == expected


def rank_peaks(model: Path, tp: int) -> list[int]:
    """Each rank's peak resident bytes after loading `model` at `tp` (fp32, one thread)
    and one forward, in a fresh process (RSS_SCRIPT)."""
    run = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(model), str(tp)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


TWO_GPUS = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: 2 GPUs"
)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=TWO_GPUS)])
@pytest.mark.parametrize("style", list(STYLES))
def test_tp2_logits_and_greedy_tokens_equal_tp1(checkpoints, style, device):
    """fp32 logits at every position within 1e-5 of one process (and of transformers),
    greedy tokens equal, for single prompts and a batch of 8 sharing steps: on CPUs
    (gloo and shared memory) and, where a machine has 2 GPUs, over NCCL."""
    hf_model, folder = checkpoints[style]
    one = falconet.load(folder, dtype="float32", device=device)
    two = falconet.load(folder, dtype="float32", tp=2, device=device)
    try:
        [worker] = _workers()  # a real process
        assert worker.pid == two.model.workers.pids()[0]
        assert_tp_equals_one_process(one, two, hf_model)
        ranks = two.model.peak_rss()
        assert len(ranks) == 2 and all(peak > 100e6 for peak in ranks)
    finally:
        two.close()
    assert not _workers()  # close() stopped the worker


def test_head_counts_that_do_not_divide_fail_before_any_worker(checkpoints):
    folder = checkpoints["40b"][1]  # 8 query heads, 2 kv heads
    with pytest.raises(TensorParallelError, match=r"--tp 3: num_attention_heads 8 .*\(1, 2\)"):
        falconet.load(folder, dtype="float32", tp=3)
    with pytest.raises(TensorParallelError, match=r"--tp 4: kv heads 2 is not divisible"):
        falconet.load(folder, dtype="float32", tp=4)
    assert not _workers()
    cli = subprocess.run(
        [sys.executable, "-m", "falconet", "serve", "--model", str(folder), "--tp", "3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 2
    assert (
        cli.stderr.strip()
        .splitlines()[-1]
        .startswith("falconet: error: --tp 3: num_attention_heads 8 is not divisible by 3")
    )


def _stream_text(client, prompt: list[int], max_tokens: int = 10) -> tuple[str, str]:
    text, finish = "", None
    for chunk in client.completions.create(
        model="m", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
    ):
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    return text, finish


@pytest.mark.parametrize("style", list(STYLES))
def test_serve_tp2_streams_what_one_process_generates(checkpoints, style):
    """`falconet serve --tp 2`: streamed completions equal `LLM`'s greedy text on one
    process, alone and as 8 concurrent requests."""
    folder = checkpoints[style][1]
    one = falconet.load(folder, dtype="float32")
    greedy = SamplingParams(max_tokens=10, ignore_eos=True)
    expected = [c.text for c in one.complete(PROMPTS, greedy)]
    args = ("--model", str(folder), "--tp", "2", "--dtype", "float32", "--max-batch", "8",
            "--served-model-name", "m")  # fmt: skip
    with ServerProcess(*args) as server:
        client = server.openai_client(timeout=120)
        solo = [_stream_text(client, p) for p in PROMPTS]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda p: _stream_text(client, p), PROMPTS))
        assert solo == together
        assert [text for text, _ in solo] == expected
        assert {finish for _, finish in solo} == {"length"}
        line = next(x for x in server.lines if "tensor parallel over 2 ranks" in x)
        worker = psutil.Process(int(re.search(r"rank 1 pid (\d+)", line).group(1)))
    assert server.proc.returncode == 0  # SIGTERM: a clean stop, the worker stopped with it
    assert not worker.is_running()


def test_sigkill_of_a_worker_stops_the_server_with_a_message(checkpoints):
    folder = checkpoints["7b"][1]
    with ServerProcess("--model", str(folder), "--tp", "2", "--dtype", "float32") as server:
        line = next(x for x in server.lines if "tensor parallel over 2 ranks" in x)
        worker = int(re.search(r"rank 1 pid (\d+)", line).group(1))
        assert worker in {p.pid for p in psutil.Process(server.proc.pid).children()}
        os.kill(worker, signal.SIGKILL)
        start = time.monotonic()
        code = server.proc.wait(timeout=30)
        elapsed = time.monotonic() - start
        server._reader.join(5)
    assert code != 0 and elapsed < 10
    assert any(
        re.search(r"falconet: error: tensor-parallel rank 1 \(pid \d+\) died \(signal SIGKILL\)", x)
        for x in server.lines
    ), server.lines


RSS_SCRIPT = """
import json, sys
import torch
import falconet
from falconet.parallel.runtime import peak_resident_bytes
folder, tp = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
llm = falconet.load(folder, dtype="float32", tp=tp)
llm.logits(list(range(1, 9)))  # every weight read once
if tp == 1:
    print(json.dumps([peak_resident_bytes()]))
else:
    print(json.dumps(llm.model.peak_rss()))
    llm.close()
"""


def _random_llama(folder: Path, hidden: int = 1024, layers: int = 6, vocab: int = 8192) -> None:
    """A Llama-style model, by default of ~100 M fp32 weights (~420 MB), written straight
    to safetensors (random values: memory, not numbers, is measured)."""
    from safetensors.torch import save_file

    from falconet.models.checkpoint import expected_tensors
    from falconet.models.registry import config_from_hf
    from tests.conftest import write_tokenizer

    hf = dict(model_type="llama", vocab_size=vocab, hidden_size=hidden,
              intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
              bos_token_id=11, eos_token_id=11, torch_dtype="float32")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    tensors = {
        name: torch.randn(shape, generator=g) * 0.02
        for name, shape in expected_tensors(config_from_hf(hf)).items()
    }
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf))
    write_tokenizer(folder)


def test_each_rank_holds_about_half_the_model(tmp_path):
    """The peak resident memory a rank adds for a ~420 MB model (VmHWM in each rank's
    own process, after loading its shard and running a forward) is at most 0.6x what
    one process adds for the whole model. "Adds": above the peak of a process that ran a
    tiny model the same way (Python, torch and falconet's own ~400 MB, the same in every
    process, are not the model's)."""
    _random_llama(tmp_path / "tiny", hidden=64, layers=1, vocab=512)
    _random_llama(tmp_path / "model")
    peaks = rank_peaks
    [empty] = peaks(tmp_path / "tiny", 1)
    [one] = peaks(tmp_path / "model", 1)
    whole = one - empty
    assert whole > 400e6  # the whole model was resident (~420 MB of fp32 weights)
    ranks = [peak - empty for peak in peaks(tmp_path / "model", 2)]
    assert len(ranks) == 2
    assert max(ranks) <= 0.6 * whole, (ranks, whole)


def test_torchrun_job_generates_what_one_process_does(checkpoints):
    """The documented several-node command, on one node: `torchrun ... -m falconet
    generate --tp 2`; rank 0 prints, rank 1 follows; the output is one process's."""
    folder = str(checkpoints["11b"][1])
    flags = ["generate", "The quick", "--model", folder, "--max-tokens", "8",
             "--dtype", "float32", "--json"]  # fmt: skip
    alone = subprocess.run([sys.executable, "-m", "falconet", *flags],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    job = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", "-m", "falconet", *flags, "--tp", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert alone.returncode == 0 and job.returncode == 0, job.stderr
    assert json.loads(job.stdout) == json.loads(alone.stdout)


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_quantized_shards_are_whole_blocks_of_the_one_process_model(checkpoints, quant):
    """Quantized at load, each rank quantizes its slice: rows whole (column-parallel) or
    32-value blocks of each row (row-parallel), so the ranks hold exactly the one-process
    model's blocks, and the logits differ only by the all-reduce's summation order."""
    folder = checkpoints["7b"][1]  # 4 heads of 16: 32 attention-output inputs per rank
    one = falconet.load(folder, dtype="float32", quant=quant)
    two = falconet.load(folder, dtype="float32", quant=quant, tp=2)
    try:
        assert two.model.storage_summary().startswith(quant)
        ids = list(range(30, 59))
        expected = one.logits(ids)
        assert (two.logits(ids) - expected).abs().max().item() <= 1e-5 * max(
            1.0, expected.abs().max().item()
        )
        greedy = SamplingParams(max_tokens=10, ignore_eos=True)
        assert [c.token_ids for c in two.complete(PROMPTS, greedy)] == [
            c.token_ids for c in one.complete(PROMPTS, greedy)
        ]
    finally:
        two.close()
    with pytest.raises(TensorParallelError, match=r"--tp 4 with q8_0: the attention output's 16"):
        falconet.load(folder, dtype="float32", quant="q8_0", tp=4)


@pytest.mark.parametrize("style", ["40b", "falcon3"])
def test_bf16_partial_sums_are_rounded_once_over_the_ranks(checkpoints, style, tmp_path):
    """bf16 weights: a row-parallel rank keeps its partial sums in fp32, the sum over ranks
    is rounded to bf16 once, as one process rounds its whole sum, so TP=2 gives one
    process's logits (measured: all equal; rounding each rank's partial first made 66 %
    and 81 % of them differ, and changed the greedy tokens of the Falcon3 model)."""
    hf_model, _ = checkpoints[style]
    # a copy: the module's fixture is shared, and in fp32
    folder = save_hf_model(copy.deepcopy(hf_model).to(torch.bfloat16), tmp_path / "bf16")
    ids = list(range(30, 59))
    one = falconet.load(folder, dtype="bfloat16")
    two = falconet.load(folder, dtype="bfloat16", tp=2)
    try:
        assert two.model.local.get_submodule(two.model.local.embeddings_name).weight.dtype == (
            torch.bfloat16
        )
        expected, got = one.logits(ids), two.logits(ids)
        assert (got != expected).float().mean().item() <= 0.01
        greedy = SamplingParams(max_tokens=20, ignore_eos=True)
        assert [c.token_ids for c in two.complete(PROMPTS, greedy)] == [
            c.token_ids for c in one.complete(PROMPTS, greedy)
        ]
    finally:
        two.close()


@pytest.fixture(scope="module")
def mamba_checkpoints(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    out = {}
    for variant in ("conv4_tied", "conv3_bias_untied"):
        model = build_falcon_mamba_hf_model(variant)
        out[variant] = (model, save_hf_model(model, tmp_path_factory.mktemp(variant)))
    return out


@pytest.mark.parametrize("variant", ["conv4_tied", "conv3_bias_untied"])
def test_falcon_mamba_tp2_equals_one_process(mamba_checkpoints, variant):
    """Falcon-Mamba split as vLLM splits Mamba: each rank holds half of the inner
    channels (in_proj's u and z halves, the conv filters, dt_proj, A_log, D) and half of
    each sequence's conv and SSM state; x_proj and out_proj are row-parallel. fp32 logits
    within 1e-5 of one process (measured ~1e-6) and of transformers within 1e-4; greedy
    tokens equal for 8 prompts sharing steps (prefill chunks and decodes, slots reused)."""
    hf_model, folder = mamba_checkpoints[variant]
    one = falconet.load(folder, dtype="float32")
    two = falconet.load(folder, dtype="float32", tp=2)
    try:
        full = one.config
        conv, ssm = two.model.config.ssm_state_shapes()
        assert conv == (full.intermediate_size // 2, full.conv_kernel - 1)
        assert ssm == (full.intermediate_size // 2, full.state_size)
        assert_tp_equals_one_process(one, two, hf_model)
    finally:
        two.close()


def test_serve_tp2_streams_a_falcon_mamba(mamba_checkpoints):
    assert_served_tp2_equals_one_process(mamba_checkpoints["conv4_tied"][1])


# Falcon-H1 variants (conftest.FALCON_H1_VARIANTS) and one more: a single Mamba group
# with the gated norm, whose group then spans both ranks
H1_CASES = [*FALCON_H1_VARIANTS, "one_group_norm"]


@pytest.fixture(scope="module")
def h1_checkpoints(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    out = {}
    for case in H1_CASES:
        changes = None
        if case == "one_group_norm":
            changes = {**FALCON_H1_VARIANTS["auto_sizes_clamped"], "mamba_rms_norm": True}
        model = build_falcon_h1_hf_model(case, changes)
        out[case] = (model, save_hf_model(model, tmp_path_factory.mktemp(case)))
    return out


@pytest.mark.parametrize("case", H1_CASES)
def test_falcon_h1_tp2_equals_one_process(h1_checkpoints, case):
    """Falcon-H1 split over 2 ranks: attention and MLP as Llama's, Mamba-2 by heads (B and
    C by groups where 2 divides them, else whole on each rank). With one group and the
    gated norm, the norm sums its squares over the ranks (without that: 0.49 off and other
    tokens). fp32 logits within 1e-5 of one process (measured 1e-6 to 3e-6)."""
    hf_model, folder = h1_checkpoints[case]
    one = falconet.load(folder, dtype="float32")
    two = falconet.load(folder, dtype="float32", tp=2)
    try:
        full = one.config
        mamba = two.model.local.model.layers[0].mamba
        assert mamba.n_heads == full.mamba_n_heads // 2
        spans = full.mamba_rms_norm and full.mamba_n_groups == 1
        assert (mamba.norm is not None and mamba.norm.reduce_squares is not None) == spans
        assert_tp_equals_one_process(one, two, hf_model)
    finally:
        two.close()


def test_serve_tp2_streams_a_falcon_h1(h1_checkpoints):
    assert_served_tp2_equals_one_process(h1_checkpoints["gate_then_norm"][1])


def test_splits_a_model_cannot_take_fail_before_any_worker(h1_checkpoints, tmp_path):
    folder = h1_checkpoints["gate_then_norm"][1]  # 2 Mamba groups, 4 heads
    with pytest.raises(TensorParallelError, match="--tp 4: mamba_n_groups 2 is not divisible"):
        falconet.load(folder, dtype="float32", tp=4)
    build_bitnet_model(tmp_path / "bitnet", {}, seed=1)
    with pytest.raises(
        TensorParallelError, match=r"ternary \(BitNet\) checkpoints run with --tp 1"
    ):
        falconet.load(tmp_path / "bitnet", dtype="float32", tp=2)
    assert not _workers()
