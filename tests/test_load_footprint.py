"""What a process that only runs models carries: loading and generating never import
torch._dynamo (and with it triton and sympy). On the meta device torch's initializers run
through a decomposition that imports it -- ~140 MiB resident per process, paid again by
every tensor-parallel rank -- so models are built with the initializers skipped
(registry.Architecture.shapes). Checked in a fresh interpreter, for every registered
architecture, a GGUF file and the embedded default model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from falconet.convert import convert_hf_to_gguf
from tests.conftest import TINY_HF_MODELS, save_hf_model

ARCHS = [("falcon", "7b"), ("llama", "falcon3_shape"), ("falcon_mamba", "conv4_tied"),
         ("falcon_h1", "gate_then_norm")]  # fmt: skip
HEAVY = ("torch._dynamo", "triton", "sympy")

CHILD = """
import json, sys
import falconet
out = {}
for path in sys.argv[1:]:
    llm = falconet.load(path if path != "-" else None)
    done = llm.complete(["the law"], max_tokens=3, ignore_eos=True)
    out[path] = len(done[0].token_ids)
out["heavy"] = [m for m in %r if m in sys.modules]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[str]:
    paths = []
    for arch, variant in ARCHS:
        build, _ = TINY_HF_MODELS[arch]
        paths.append(str(save_hf_model(build(variant), tmp_path_factory.mktemp(arch))))
    gguf = tmp_path_factory.mktemp("gguf") / "falcon-q8_0.gguf"
    convert_hf_to_gguf(paths[0], gguf, "q8_0")
    return [*paths, str(gguf), "-"]  # "-": the embedded default model


def test_loading_and_generating_import_no_compiler(models):
    res = subprocess.run([sys.executable, "-c", CHILD % (HEAVY,), *models],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert all(out[p] == 3 for p in models), out  # each model really generated
    assert out["heavy"] == [], f"imported while loading or generating: {out['heavy']}"


def test_skipping_initializers_touches_only_meta_tensors_and_restores_them():
    """While models are built the initializers skip meta tensors only (a real tensor built
    meanwhile in another thread still gets its values), nested or overlapping builds keep
    them patched until the last ends, and torch.nn.init is as it was afterwards."""
    import torch

    from falconet.models import registry

    original = torch.nn.init.normal_
    with registry._initializers_skipped():
        with registry._initializers_skipped():
            meta = torch.empty(4, device="meta")
            assert torch.nn.init.normal_(meta) is meta
        assert torch.nn.init.normal_ is not original  # the outer build is still on
        real = torch.zeros(4096)
        torch.nn.init.normal_(real)
        assert real.std() > 0.5
    assert torch.nn.init.normal_ is original
