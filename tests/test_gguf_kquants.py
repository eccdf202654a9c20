"""llama.cpp's K-quant files (Q4_K_M, Q5_K_M, Q6_K) in falconet: the blocks stay the file's
mapped bytes and run through the compiled K-quant kernels, the greedy tokens are
llama.cpp's on the same file, and a run's peak memory stays near the file's size.

The files: a tiny HF Falcon 256 wide (every matrix splits into whole 256-value
super-blocks, so llama.cpp's mixes put K-quants nearly everywhere), written to an f32
GGUF by falconet's converter (byte-equal to llama.cpp's converter, tests/test_gguf.py),
then quantized by llama.cpp's own quantizer through llama-cpp-python.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

import falconet
from falconet.convert import convert_hf_to_gguf
from falconet.quant import kernels
from falconet.quant.linear import QuantEmbedding, QuantLinear
from falconet.tokenizer import Tokenizer
from tests import llama_cpp_tools
from tests.conftest import CORPUS, build_hf_model, memorize
from tests.test_gguf import falconet_greedy, llama_cpp_greedy, prompt, write_falcon_tokenizer

T = GGMLQuantizationType
K_TYPES = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}
FILE_TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K")
pytestmark = pytest.mark.skipif(kernels.native is None, reason="compiled kernels not built")


def falcon_folder(folder: Path, train: bool, **shape) -> Path:
    """A Falcon-7B-shaped HF folder (multi-query, parallel attention) with Falcon's
    tokenizer; trained to continue the corpus where `train` (greedy margins of several
    logits, see test_gguf.memorizing_model)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_falcon_tokenizer(folder)
    model = build_hf_model("7b", **shape)
    if train:
        model = memorize(model, Tokenizer.from_dir(folder).encode(CORPUS)[:32])
    model.save_pretrained(folder)
    return folder


def llama_cpp_quantized(src: Path, ftype: str) -> Path:
    out = src.with_name(f"{src.stem.removesuffix('-f32')}-{ftype}.gguf")
    llama_cpp_tools.quantize(src, out, f"MOSTLY_{ftype}")
    return out


@pytest.fixture(scope="module")
def kquant_files(tmp_path_factory):
    """(HF folder, {file type: path}) for a 256-wide two-layer Falcon."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    root = tmp_path_factory.mktemp("kquants")
    folder = falcon_folder(root / "hf", train=True, hidden_size=256)
    f32 = root / "falcon-f32.gguf"
    convert_hf_to_gguf(folder, f32, "f32")
    return folder, {ftype: llama_cpp_quantized(f32, ftype) for ftype in FILE_TYPES}


@pytest.mark.parametrize("ftype", FILE_TYPES)
def test_llama_cpp_kquant_file_keeps_its_blocks(kquant_files, ftype):
    """Every K-quant matrix of the file is held by a quantized module as the file's own
    bytes, a view of its mapping: nothing is dequantized or copied at load."""
    path = kquant_files[1][ftype]
    in_file = {
        digest(np.asarray(t.data)): t.tensor_type
        for t in GGUFReader(path).tensors
        if t.tensor_type in K_TYPES and len(t.shape) == 2
    }
    assert len(set(in_file.values())) >= 1 and len(in_file) >= 8
    llm = falconet.load(path)
    held = {
        digest(m.weight_blocks.numpy()): m.fmt.ggml_type
        for m in llm.model.modules()
        if isinstance(m, QuantLinear | QuantEmbedding) and m.fmt.ggml_type in K_TYPES
    }
    assert held == in_file
    assert all(
        m.mapped and m.layout == "ggml"
        for m in llm.model.modules()
        if isinstance(m, QuantLinear) and m.fmt.ggml_type in K_TYPES
    )


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.mark.parametrize("ftype", FILE_TYPES)
def test_llama_cpp_kquant_file_decodes_like_llama_cpp(kquant_files, ftype):
    folder, files = kquant_files
    ids = prompt(folder)
    ref_tokens, ref_logits = llama_cpp_greedy(files[ftype], ids, 16)
    tokens, logits = falconet_greedy(files[ftype], ids, 16)
    assert tokens == ref_tokens
    assert np.abs(logits - ref_logits).max() <= 0.03 * np.abs(ref_logits).max()


# ---- memory -----------------------------------------------------------------------------

# The peak is the child's VmHWM (its own memory's high-water mark). getrusage's ru_maxrss
# would do on a fresh process, but subprocess starts children with vfork, and Linux then
# carries the parent's peak (pytest's, hundreds of MB) into the child's ru_maxrss.
PEAK_RSS = textwrap.dedent(
    """
    import json, sys
    import falconet
    from falconet.quant.linear import QuantLinear
    llm = falconet.load(sys.argv[1])
    llm.complete([[1, 2, 3, 4, 5]], max_tokens=4, temperature=0.0, ignore_eos=True)
    kinds = sorted({m.qtype for m in llm.model.modules() if isinstance(m, QuantLinear)})
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    peak = int(status["VmHWM"].split()[0]) * 1024  # "123 kB"
    print(json.dumps({"peak": peak, "kinds": kinds}))
    """
)


def peak_rss(path: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_kquant_run_peak_memory_is_the_file_size(tmp_path):
    """Peak RSS of load + a short generation from a Q4_K_M file, less the same run on a
    tiny Q4_K_M file of the same architecture (the interpreter, torch, falconet and the
    engine's fixed costs, measured the same way), is at most 1.1x the big file's size. The
    mapped blocks are read in place, so the file's pages are the weights' only copy; a
    dequantized bf16 copy would add ~3.5x the file."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    files = {}
    for name, shape in (("tiny", dict(hidden_size=256, num_hidden_layers=1)),
                        ("big", dict(hidden_size=1024, num_hidden_layers=6, num_attention_heads=16))):  # fmt: skip
        folder = falcon_folder(tmp_path / name, train=False, **shape)
        f16 = tmp_path / f"{name}-f16.gguf"
        convert_hf_to_gguf(folder, f16, "f16")
        files[name] = llama_cpp_quantized(f16, "Q4_K_M")
        f16.unlink()
    size = files["big"].stat().st_size
    assert size > 30e6  # ~64M weights
    base, big = peak_rss(files["tiny"]), peak_rss(files["big"])
    assert "q4_k" in big["kinds"]
    assert big["peak"] - base["peak"] <= 1.1 * size, (big["peak"] - base["peak"]) / size
