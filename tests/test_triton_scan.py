"""nn/triton_scan.py in Triton's CPU interpreter: Mamba-1's selective scan and Mamba-2's
SSD recurrence against the PyTorch reference paths (nn/selective_scan.py, nn/ssd.py) on
odd shapes, within 1e-5 relative in fp32, and a prompt fed in pieces giving the same bits
as fed whole.

As in tests/test_triton_kernels.py, TRITON_INTERPRET=1 must be set before `import
triton`, so every kernel call runs in one child process: the tests save the inputs, the
child runs the calls and saves the outputs, the assertions run here. The interpreter is
slow (a Python loop per program and token), so the shapes are tiny; the block sizes are
forced small so that channel and head blocks end in partial tiles. On a GPU the dispatch
itself is checked by test_cuda_dispatch_matches_the_pytorch_path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from falconet.nn import selective_scan as scan
from falconet.nn import ssd
from falconet.nn.scan_paths import triton_applies

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

# Mamba-1 (batch, tokens, E channels, N states, channels per program): E off the block,
# N odd and Falcon-Mamba's 16, decode (T = 1), one block wider than E
SELECTIVE = {
    "sel-odd": (2, 37, 13, 5, 4),
    "sel-decode": (1, 1, 13, 16, 8),
    "sel-wide-block": (3, 37, 7, 16, None),
}
# Mamba-2 (batch, tokens, H heads, P head dim, G groups, N states, head channels per
# program): P = 6 over two blocks of 4, several groups, decode
SSD = {
    "ssd-odd": (2, 37, 4, 6, 2, 5, 4),
    "ssd-decode": (1, 1, 6, 6, 3, 16, None),
    "ssd-one-group": (2, 37, 3, 6, 1, 16, None),
}
PIECES = [0, 1, 17, 37]  # a token, 16 tokens, then 20: the joints fall anywhere
CHUNK = 8  # the PyTorch SSD's chunk: does not divide 37

CHILD = """
import json, sys
import torch
from falconet.nn import selective_scan as scan, ssd, triton_scan

calls = json.load(open(sys.argv[1]))
inputs = torch.load(sys.argv[2])
out = {"available": torch.tensor(triton_scan.available())}
for name, (op, block, cuts) in calls.items():
    state, *rest = inputs[name]
    state = state.clone()  # keeps the strides: a transposed state stays transposed
    ys = []
    for a, b in zip(cuts, cuts[1:]):
        args = [t[:, a:b] if i in (0, 1, 3, 4) else t for i, t in enumerate(rest)]
        if op == "selective":
            ys.append(scan.triton_selective_scan(state, *args, block_e=block))
        else:
            ys.append(ssd.triton_ssd_scan(state, *args, block_p=block))
    out[name] = (torch.cat(ys, dim=1), state)
torch.save(out, sys.argv[3])
"""


def selective_inputs(Bt: int, T: int, E: int, N: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """h, u, dt, A, B, C as the Mamba-1 mixer makes them (dt a softplus, A = -exp(A_log)),
    with a carried, non-zero initial state."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(Bt, E, N, generator=g)
    u = torch.randn(Bt, T, E, generator=g)
    dt = F.softplus(torch.randn(Bt, T, E, generator=g) - 1)
    A = -torch.exp(torch.randn(E, N, generator=g))
    B = torch.randn(Bt, T, N, generator=g)
    C = torch.randn(Bt, T, N, generator=g)
    return h, u, dt, A, B, C


def ssd_inputs(
    Bt: int, T: int, H: int, P: int, G: int, N: int, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """state, x, dt, A, B, C, D as the Mamba-2 mixer makes them, a non-zero initial state."""
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(Bt, H, P, N, generator=g)
    x = torch.randn(Bt, T, H, P, generator=g)
    dt = F.softplus(torch.randn(Bt, T, H, generator=g) - 1)
    A = -torch.exp(torch.randn(H, generator=g))
    B = torch.randn(Bt, T, G, N, generator=g)
    C = torch.randn(Bt, T, G, N, generator=g)
    D = torch.randn(H, generator=g)
    return state, x, dt, A, B, C, D


def cases() -> dict[str, tuple[list, tuple[torch.Tensor, ...]]]:
    """name -> ((op, block, token cuts), inputs) for every call the child runs."""
    out = {}
    for name, (Bt, T, E, N, block) in SELECTIVE.items():
        out[name] = (["selective", block, [0, T]], selective_inputs(Bt, T, E, N))
    h, *rest = selective_inputs(*SELECTIVE["sel-odd"][:4])
    out["sel-pieces"] = (["selective", 4, PIECES], (h, *rest))
    # a state that is a transposed view: the wrapper scans a contiguous copy, writes it back
    out["sel-strided-state"] = (
        ["selective", 4, [0, 37]],
        (h.transpose(1, 2).contiguous().transpose(1, 2), *rest),
    )
    for name, (Bt, T, H, P, G, N, block) in SSD.items():
        out[name] = (["ssd", block, [0, T]], ssd_inputs(Bt, T, H, P, G, N))
    out["ssd-pieces"] = (["ssd", 4, PIECES], ssd_inputs(*SSD["ssd-odd"][:6]))
    return out


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, object]:
    """Every call of `cases()` run by the Triton interpreter in a subprocess."""
    folder = tmp_path_factory.mktemp("triton_scan")
    calls, inputs = {}, {}
    for name, (call, tensors) in cases().items():
        calls[name], inputs[name] = call, tensors
    (folder / "calls.json").write_text(json.dumps(calls))
    torch.save(inputs, folder / "inputs.pt")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "calls.json", "inputs.pt", "outputs.pt"],
        cwd=folder,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[1])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode:
        pytest.fail(f"interpreter run failed:\n{proc.stderr[-4000:]}")
    return torch.load(folder / "outputs.pt")


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_available(interpreted):
    assert interpreted["available"]


@pytest.mark.parametrize("name", SELECTIVE)
def test_selective_scan_matches_the_pytorch_path(interpreted, name):
    h, u, dt, A, B, C = selective_inputs(*SELECTIVE[name][:4])
    h_ref = h.clone()
    ref = scan.torch_selective_scan(h_ref, u, dt, A, B, C)
    y, h_got = interpreted[name]
    assert y.dtype == torch.float32 and y.shape == u.shape
    assert rel_diff(y, ref) <= 1e-5
    assert rel_diff(h_got, h_ref) <= 1e-5
    assert not torch.equal(h_got, h)  # the state did advance


@pytest.mark.parametrize("name", SSD)
def test_ssd_recurrence_matches_the_pytorch_paths(interpreted, name):
    state, x, dt, A, B, C, D = ssd_inputs(*SSD[name][:6])
    ref, final = ssd.torch_ssd_chunked(x, dt, A, B, C, D, CHUNK, state)
    y, s_got = interpreted[name]
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert rel_diff(y, ref) <= 1e-5
    assert rel_diff(s_got, final) <= 1e-5
    # and the decode step's recurrence, token by token
    s_step = state.clone()
    steps = [
        ssd.torch_ssd_step(s_step, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        for t in range(x.shape[1])
    ]
    assert rel_diff(y, torch.stack(steps, dim=1)) <= 1e-5
    assert rel_diff(s_got, s_step) <= 1e-5


@pytest.mark.parametrize("whole, pieces", [("sel-odd", "sel-pieces"), ("ssd-odd", "ssd-pieces")])
def test_pieces_give_the_same_bits_as_one_call(interpreted, whole, pieces):
    # each program walks its tokens with one arithmetic order, so cutting the tokens into
    # calls (chunked prefill, then decode) changes no bit of the output or the state
    y_whole, state_whole = interpreted[whole]
    y_pieces, state_pieces = interpreted[pieces]
    assert torch.equal(y_pieces, y_whole)
    assert torch.equal(state_pieces, state_whole)


def test_a_strided_state_is_advanced_in_place(interpreted):
    y, h_got = interpreted["sel-strided-state"]
    y_ref, h_ref = interpreted["sel-odd"]
    assert h_got.stride() != h_ref.stride()  # it stayed a transposed view
    assert torch.equal(y, y_ref) and torch.equal(h_got, h_ref)


def test_bad_shapes_are_refused_before_a_launch():
    h, u, dt, A, B, C = selective_inputs(1, 3, 5, 4)
    with pytest.raises(ValueError, match=r"selective_scan: B is \(1, 3, 3\), expected \(1, 3, 4\)"):
        scan.triton_selective_scan(h, u, dt, A, B[..., :3], C)
    state, x, dt, A, B, C, D = ssd_inputs(1, 3, 4, 6, 2, 5)
    with pytest.raises(ValueError, match="ssd scan: the state must be float32"):
        ssd.triton_ssd_scan(state.double(), x, dt, A, B, C, D)


def test_cpu_tensors_never_take_the_triton_path():
    # the path depends on the device only: CPU runs the compiled kernel or PyTorch
    tensors = selective_inputs(1, 3, 5, 4)
    assert not triton_applies(*tensors)
    assert not triton_applies(*ssd_inputs(1, 3, 4, 6, 2, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_dispatch_matches_the_pytorch_path():
    h, u, dt, A, B, C = (t.cuda() for t in selective_inputs(2, 37, 13, 5))
    assert triton_applies(h, u, dt, A, B, C)
    h_ref, h_got = h.clone(), h.clone()
    ref = scan.torch_selective_scan(h_ref, u, dt, A, B, C)
    assert rel_diff(scan.selective_scan(h_got, u, dt, A, B, C), ref) <= 1e-5
    assert rel_diff(h_got, h_ref) <= 1e-5
    state, x, dt, A, B, C, D = (t.cuda() for t in ssd_inputs(2, 37, 4, 6, 2, 5))
    ref, final = ssd.torch_ssd_chunked(x, dt, A, B, C, D, CHUNK, state)
    y, got = ssd.ssd_chunked(x, dt, A, B, C, D, CHUNK, state)
    assert rel_diff(y, ref) <= 1e-5 and rel_diff(got, final) <= 1e-5
    s = state.clone()
    y1 = ssd.ssd_step(s, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    y_one, _ = ssd.ssd_chunked(x[:, :1], dt[:, :1], A, B[:, :1], C[:, :1], D, CHUNK, state)
    assert torch.equal(y1, y_one[:, 0])  # decode and prefill share the kernel's step
