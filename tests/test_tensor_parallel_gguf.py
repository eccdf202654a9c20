"""Tensor parallelism over GGUF files on 2 gloo ranks: each rank reads its slices of the
file's own blocks (Q8_0, Q4_0, K-quants; never requantized), for each Falcon style and
Falcon3, through `LLM` and `falconet serve --tp 2`; a row-parallel matrix whose per-rank
inputs are not whole blocks of its type fails before any worker starts; a rank holds
about half the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import falconet
from falconet.convert import convert_hf_to_gguf
from falconet.models.checkpoint import read_gguf
from falconet.parallel import TensorParallelError
from falconet.quant import get_format
from falconet.sampling import SamplingParams
from tests.conftest import (
    build_falcon_mamba_hf_model,
    build_hf_model,
    build_llama_hf_model,
    save_hf_model,
)
from tests.test_tensor_parallel import (
    PROMPTS,
    _random_llama,
    assert_served_tp2_equals_one_process,
    rank_peaks,
)
from tests.test_ternary import build_bitnet_model, tq_scales

# (builder, variant, config changes): every row-parallel input splits into whole 32-value
# blocks at TP=2 (Falcon3's MLP is 128 wide for it); "kquant" has 256-value rows per rank
MODELS = {
    "7b": (build_hf_model, "7b", {}),
    "40b": (build_hf_model, "40b", {}),
    "11b": (build_hf_model, "11b", {}),
    "falcon3": (build_llama_hf_model, "falcon3_shape", dict(intermediate_size=128)),
    "kquant": (build_llama_hf_model, "falcon3_shape", dict(
        hidden_size=256, head_dim=128, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=1024)),
}  # fmt: skip
IDS = list(range(30, 59))
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)
# (model, file type, the rank's column- and row-parallel matrices checked byte for byte)
FALCON_PAIR = ("transformer.h.1.mlp.dense_h_to_4h", "transformer.h.1.self_attention.dense")
LLAMA_PAIR = ("model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj")
CASES = [
    *[(m, q, FALCON_PAIR) for m in ("7b", "40b", "11b") for q in ("q8_0", "q4_0")],
    *[("falcon3", q, LLAMA_PAIR) for q in ("q8_0", "q4_0")],
    *[("kquant", q, LLAMA_PAIR) for q in ("q4_k_m", "q6_k")],
]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    """gguf(model, type) -> the path of that model's GGUF file of that type (made once);
    gguf(model) -> its Hugging Face folder."""
    root = tmp_path_factory.mktemp("tp_gguf")
    folders: dict[str, Path] = {}
    files: dict[tuple[str, str], Path] = {}

    def make(model: str, qtype: str | None = None) -> Path:
        if model not in folders:
            build, variant, changes = MODELS[model]
            folders[model] = save_hf_model(build(variant, **changes), root / model)
        if qtype is None:
            return folders[model]
        if (model, qtype) not in files:
            files[model, qtype] = root / f"{model}-{qtype}.gguf"
            convert_hf_to_gguf(folders[model], files[model, qtype], qtype)
        return files[model, qtype]

    return make


def _file_blocks(path: Path, name: str) -> tuple[torch.Tensor, object]:
    t = read_gguf(path).tensors[name + ".weight"]
    return torch.from_numpy(t.data.copy()), get_format(t.tensor_type)


@pytest.mark.parametrize(("model", "qtype", "pair"), CASES)
def test_gguf_tp2_runs_the_files_blocks_and_equals_one_process(gguf, model, qtype, pair):
    """Rank 0 holds the file's bytes: the first half of a column-parallel matrix's rows,
    the first half of each row's blocks of a row-parallel one. Logits equal one process's
    up to the all-reduce's summation order (Q8_0 / Q4_0: within 1e-5). K-quants round
    each 256 activations to 8 bits (Q8_K), so a last-bit difference that lands on a
    rounding boundary moves an activation by a step; measured here 3e-6 (q6_k) and 0.4 %
    of the largest logit (q4_k_m), asserted within 1 %. Greedy tokens equal, alone and in
    a batch of 8."""
    path = gguf(model, qtype)
    one = falconet.load(path, dtype="float32")
    two = falconet.load(path, dtype="float32", tp=2)
    try:
        column, row = (two.model.local.get_submodule(n) for n in pair)
        blocks, fmt = _file_blocks(path, pair[0])
        assert torch.equal(column.weight.data, blocks[: len(blocks) // 2])
        blocks, fmt = _file_blocks(path, pair[1])
        half = fmt.row_bytes(row.local.in_features)
        assert row.local.in_features * 2 == blocks.shape[1] // fmt.type_size * fmt.block_size
        assert torch.equal(row.local.weight.data, blocks[:, :half])
        expected, got = one.logits(IDS), two.logits(IDS)
        scale = expected.abs().max().item()
        tolerance = 1e-2 if "_k" in qtype else 1e-5
        assert (got - expected).abs().max().item() <= tolerance * max(1.0, scale)
        solo = [c.token_ids for c in one.complete(PROMPTS, GREEDY)]
        assert [c.token_ids for c in two.complete(PROMPTS, GREEDY)] == solo
        assert two.complete([PROMPTS[5]], GREEDY)[0].token_ids == solo[5]
    finally:
        two.close()


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
def test_ternary_gguf_tp2_splits_the_files_blocks(tmp_path, qtype):
    """llama.cpp's ternary types split like the others: rank 0 reads back the file's own
    TQ blocks (TQ1_0 is transcoded to TQ2_0 in memory, losslessly), logits within the
    8-bit activation rounding of one process's (as the K-quants above; measured 3e-7 of
    the largest logit), greedy tokens equal."""
    sizes = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=8, head_dim=64)
    build_bitnet_model(tmp_path / "hf", {}, seed=4, scales=tq_scales, **sizes)
    path = tmp_path / f"{qtype}.gguf"
    convert_hf_to_gguf(tmp_path / "hf", path, qtype)
    one = falconet.load(path, dtype="float32")
    two = falconet.load(path, dtype="float32", tp=2)
    try:
        expected, got = one.logits(IDS), two.logits(IDS)
        row = two.model.local.get_submodule(LLAMA_PAIR[1])
        blocks, fmt = _file_blocks(path, LLAMA_PAIR[1])
        assert fmt.name == qtype and row.local.qtype == qtype
        assert torch.equal(row.local.weight.data, blocks[:, : fmt.row_bytes(512)])
        assert (got - expected).abs().max().item() <= 1e-2 * expected.abs().max().item()
        solo = [c.token_ids for c in one.complete(PROMPTS, GREEDY)]
        assert [c.token_ids for c in two.complete(PROMPTS, GREEDY)] == solo
    finally:
        two.close()


def test_k_quant_mix_at_load_gives_each_rank_the_one_process_blocks(gguf):
    """`quant="q4_k_m"` on a Hugging Face folder: each rank quantizes its slices to the
    types the one-process plan gives (llama.cpp's mix: Q4_K, Q6_K for some), so a rank's
    blocks are the one-process model's, row-parallel ones by whole 256-value blocks;
    logits as the GGUF file's (measured 0.4 % of the largest logit), greedy tokens
    equal. A mix whose row-parallel matrices split into no whole blocks is refused."""
    folder = gguf("kquant")
    one = falconet.load(folder, dtype="float32", quant="q4_k_m")
    two = falconet.load(folder, dtype="float32", quant="q4_k_m", tp=2)
    try:
        for name in LLAMA_PAIR[1], "model.layers.0.mlp.down_proj":
            whole = one.model.get_submodule(name).weight
            mine = two.model.local.get_submodule(name).local.weight
            assert mine.fmt.name == whole.fmt.name
            half = whole.fmt.row_bytes(whole.shape[1] // 2)
            assert torch.equal(mine.data, whole.data[:, :half])
        expected, got = one.logits(IDS), two.logits(IDS)
        assert (got - expected).abs().max().item() <= 1e-2 * expected.abs().max().item()
        solo = [c.token_ids for c in one.complete(PROMPTS, GREEDY)]
        assert [c.token_ids for c in two.complete(PROMPTS, GREEDY)] == solo
    finally:
        two.close()
    with pytest.raises(TensorParallelError, match=r"--tp 4: model\.layers\.0\.self_attn\.o_proj"):
        falconet.load(folder, dtype="float32", quant="q4_k_m", tp=4)


def test_row_parallel_inputs_must_be_whole_blocks_of_the_files_type(gguf):
    path = gguf("7b", "q8_0")  # 4 heads of 16: the attention output has 64 inputs
    with pytest.raises(
        TensorParallelError,
        match=r"--tp 4: transformer\.h\.0\.self_attention\.dense\.weight \(Q8_0\) has 64 input "
        r"features, 16 per rank: not a whole number of its 32-value blocks",
    ):
        falconet.load(path, tp=4)
    cli = subprocess.run(
        [sys.executable, "-m", "falconet", "generate", "hi", "--model", str(path), "--tp", "4"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 2
    assert cli.stderr.strip().splitlines()[-1].startswith("falconet: error: --tp 4: transformer")
    with pytest.raises(falconet.FalconetError, match="a GGUF file keeps its own types"):
        falconet.load(path, tp=2, quant="q4_0")


def test_a_recurrent_models_gguf_file_runs_with_tp1(tmp_path):
    folder = save_hf_model(build_falcon_mamba_hf_model("conv4_tied"), tmp_path / "mamba")
    path = tmp_path / "mamba.gguf"
    convert_hf_to_gguf(folder, path, "f32")
    with pytest.raises(TensorParallelError, match="reads falcon_mamba models from Hugging Face"):
        falconet.load(path, dtype="float32", tp=2)


def test_serve_tp2_over_a_gguf_file_streams_what_one_process_generates(gguf):
    assert_served_tp2_equals_one_process(gguf("40b", "q4_0"))


def test_each_rank_holds_about_half_the_file(tmp_path):
    """The peak resident memory a rank adds running a ~115 MB Q8_0 file at TP=2 is at most
    0.6x what one process adds running it whole (each above a process that ran a tiny
    file the same way; see test_tensor_parallel's test of Hugging Face folders). Measured:
    115 MB whole, 65 / 65 MB per rank (0.56x; a shard's blocks are 58 MB)."""
    files = {}
    # the tiny file has the model's vocabulary: parsing its metadata costs each process
    # the same MBs, which are not the weights'
    for name, shape in {"tiny": dict(hidden=64, layers=1), "model": {}}.items():
        _random_llama(tmp_path / name, **shape)
        files[name] = tmp_path / f"{name}.gguf"
        convert_hf_to_gguf(tmp_path / name, files[name], "q8_0")
    peaks = rank_peaks

    [empty] = peaks(files["tiny"], 1)
    [one] = peaks(files["model"], 1)
    whole = one - empty
    assert whole > 100e6  # the whole file was resident (~115 MB of Q8_0 blocks)
    # each rank above the same rank running the tiny file (gloo and the worker's own
    # imports are a tensor-parallel process's, not the model's)
    ranks = [p - e for p, e in zip(peaks(files["model"], 2), peaks(files["tiny"], 2), strict=True)]
    assert len(ranks) == 2
    assert max(ranks) <= 0.6 * whole, (ranks, whole)
