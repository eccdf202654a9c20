"""LoRA adapters at inference (models/adapters.py, nn/lora.py): PEFT folders load and
give PEFT + transformers' logits, merged or beside the weights; sequences of different
adapters share batches bit for bit; quantized bases; malformed folders are refused."""

from __future__ import annotations

import json

import pytest
import torch

import falconet
from falconet.engine import Engine
from falconet.errors import AdapterError, GenerationError
from falconet.models.adapters import read_peft_adapter
from falconet.nn import lora
from falconet.sampling import SamplingParams
from tests.adapter_tools import FALCON_TARGETS, LLAMA_TARGETS, make_peft_adapter, peft_logits
from tests.conftest import (
    FALCON_H1_VARIANTS,
    build_falcon_h1_hf_model,
    build_falcon_mamba_hf_model,
    build_hf_model,
    build_llama_hf_model,
    save_hf_model,
)

IDS = [5, 17, 42, 99, 7, 300, 12, 64, 201, 33, 8, 150]


@pytest.fixture(scope="module")
def falcon(tmp_path_factory):
    """A tiny Falcon-40B-shaped model (grouped fused QKV, regrouped on load) and two adapters."""
    hf = build_hf_model("40b")
    base = save_hf_model(hf, tmp_path_factory.mktemp("falcon40b"))
    a_dir, b_dir = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    a = make_peft_adapter(hf, a_dir, FALCON_TARGETS, seed=1)
    b = make_peft_adapter(hf, b_dir, ["query_key_value"], seed=2, r=2, lora_alpha=3)
    return hf, base, {"a": (a, a_dir), "b": (b, b_dir)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A Falcon3-shaped Llama (GQA, head_dim apart) with an rsLoRA adapter using per-module
    rank and alpha patterns."""
    hf = build_llama_hf_model("falcon3_shape")
    base = save_hf_model(hf, tmp_path_factory.mktemp("falcon3"))
    a_dir = tmp_path_factory.mktemp("rs")
    a = make_peft_adapter(
        hf, a_dir, LLAMA_TARGETS, seed=3, use_rslora=True,
        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 5.0},
    )  # fmt: skip
    return hf, base, a, a_dir


def test_falcon_adapter_matches_peft_merged_and_beside(falcon):
    hf, base, adapters = falcon
    for name, (peft_model, folder) in adapters.items():
        want = peft_logits(peft_model, IDS)
        merged = falconet.load(base, adapter=folder)  # float base: merged into the weights
        assert merged.adapters is None
        torch.testing.assert_close(merged.logits(IDS), want, rtol=0, atol=1e-4)
        beside = falconet.load(base)
        beside.add_adapter(name, folder)
        got = beside.engine().score([IDS], adapter=name)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # the adapter changes the model by far more than the tolerance
    assert (peft_logits(adapters["a"][0], IDS) - peft_logits(hf, IDS)).abs().max() > 0.1


def test_llama_rslora_patterns_match_peft(llama):
    hf, base, peft_model, folder = llama
    config = read_peft_adapter(folder).config
    assert config["use_rslora"] and config["rank_pattern"] == {"down_proj": 2}
    want = peft_logits(peft_model, IDS)
    torch.testing.assert_close(
        falconet.load(base, adapter=folder).logits(IDS), want, rtol=0, atol=1e-4
    )
    beside = falconet.load(base)
    beside.add_adapter("rs", folder)
    torch.testing.assert_close(beside.engine().score([IDS], "rs")[0], want, rtol=0, atol=1e-4)
    # the base stays the base for requests that name no adapter
    torch.testing.assert_close(beside.logits(IDS), peft_logits(hf, IDS), rtol=0, atol=1e-4)


def _run(engine: Engine, jobs: list[tuple[list[int], str | None]], logits: bool = True) -> list:
    """Submit every job before any step (so they share steps); per job: generated ids,
    their logprobs and (with `logits`, which turns the prefix cache off for it) the
    prompt's logits."""
    params = SamplingParams(max_tokens=6, logprobs=0)
    streams = [engine.submit([p], [params], prompt_logits=logits, adapter=a)[0] for p, a in jobs]
    out = []
    for s in streams:
        ids, lps, logits = [], [], None
        for d in engine.iterate(s):
            assert d.finish_reason != "error", d.error
            ids += d.token_ids
            lps += [lp.logprob for lp in d.logprobs]
            logits = d.prompt_logits if d.prompt_logits is not None else logits
        out.append((ids, lps, logits))
    return out


def _same(x: tuple, y: tuple) -> bool:
    logits = x[2] is None and y[2] is None or torch.equal(x[2], y[2])
    return x[0] == y[0] and x[1] == y[1] and logits


def batch_equals_alone(llm) -> None:
    jobs = [(IDS, "a"), (IDS[:7], "b"), (IDS, None), (IDS[3:], "a"), (IDS[::-1], "b")]

    def engine() -> Engine:
        return Engine.from_llm(llm, max_batch=8, speculative=None)

    together = _run(engine(), jobs)
    for job, got in zip(jobs, together, strict=True):
        assert _same(got, _run(engine(), [job])[0]), job
    # prompts fed 4 tokens a step: steps mix one sequence's prompt rows with another's
    # decode rows (the two ways nn/lora.py computes an update); alone, the same chunks

    def chunked() -> Engine:
        return Engine.from_llm(llm, max_batch=8, speculative=None, prefill_chunk=4)

    for job, got in zip(jobs, _run(chunked(), jobs), strict=True):
        assert _same(got, _run(chunked(), [job])[0]), job
    # and the adapters do differ from each other and from the base
    assert not torch.equal(together[0][2], _run(engine(), [(IDS, None)])[0][2])
    assert not torch.equal(together[0][2], _run(engine(), [(IDS, "b")])[0][2])


def test_batch_equals_alone_across_adapters(falcon):
    _, base, adapters = falcon
    llm = falconet.load(base)
    for name, (_, folder) in adapters.items():
        llm.add_adapter(name, folder)
    batch_equals_alone(llm)


def test_batch_equals_alone_without_the_compiled_kernel(falcon, monkeypatch):
    """Where the compiled LoRA kernel cannot run (no compiler, CUDA), decode rows take the
    grouped update (every adapter stacked, a column mask): batch == alone there too, and
    the tokens are those of the kernel's run."""
    _, base, adapters = falcon
    llm = falconet.load(base)
    for name, (_, folder) in adapters.items():
        llm.add_adapter(name, folder)
    jobs = [(IDS, "a"), (IDS[:7], "b"), (IDS, None)]
    with_kernel = _run(Engine.from_llm(llm, max_batch=8, speculative=None), jobs)
    monkeypatch.setattr(lora, "native", None)
    batch_equals_alone(llm)
    grouped = _run(Engine.from_llm(llm, max_batch=8, speculative=None), jobs)
    assert [g[0] for g in grouped] == [k[0] for k in with_kernel]


def test_prefix_cache_keeps_adapters_apart(falcon):
    """The same prompt under another adapter computes its own K/V: a block cached by the
    base (or another adapter) is never reused."""
    _, base, adapters = falcon
    llm = falconet.load(base)
    llm.add_adapter("a", adapters["a"][1])
    prompt = (IDS * 4)[:40]

    def engine() -> Engine:
        return Engine.from_llm(
            llm, prefill_chunk=16, block_size=16, speculative=None, prefix_cache=True
        )

    alone = _run(engine(), [(prompt, "a")], logits=False)[0]
    shared = engine()
    _run(shared, [(prompt, None)], logits=False)  # the base caches the prompt's blocks first
    after_base = _run(shared, [(prompt, "a")], logits=False)[0]
    assert _same(after_base, alone)
    assert shared.pool.prefix.hit_tokens == 0
    again = _run(shared, [(prompt, "a")], logits=False)[0]  # its own blocks: reused, exactly
    assert _same(again, alone)
    assert shared.pool.prefix.hit_tokens == 32


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_adapters_on_quantized_base(falcon, qtype):
    """The update runs in float beside the quantized layers. Its inputs carry the base's
    quantization error, so the logits with the adapter differ from the float model's by
    about what the base alone differs by: asserted within twice that (measured: 0.85x for
    q8_0, 1.16x for q4_0),
    while the adapter's own effect is far larger."""
    _, base, adapters = falcon
    (_, a_dir), (_, b_dir) = adapters["a"], adapters["b"]
    float_base = falconet.load(base)
    float_a = falconet.load(base, adapter=a_dir)
    quant_a = falconet.load(base, quant=qtype, adapter=a_dir)
    assert quant_a.adapters is not None and quant_a.adapter == a_dir.name  # not merged
    quant_base = falconet.load(base, quant=qtype)
    base_error = (quant_base.logits(IDS) - float_base.logits(IDS)).abs().max()
    adapter_error = (quant_a.logits(IDS) - float_a.logits(IDS)).abs().max()
    effect = (float_a.logits(IDS) - float_base.logits(IDS)).abs().max()
    assert effect > 5 * base_error
    assert adapter_error <= 2 * base_error
    quant_base.add_adapter("a", a_dir)
    quant_base.add_adapter("b", b_dir)
    batch_equals_alone(quant_base)


def test_adapter_on_a_gguf_file(falcon, tmp_path):
    """A q8_0 GGUF written from the base takes the adapter as the quantized-at-load base
    does: beside its block weights, batch == alone; a GGUF Falcon-H1 (multipliers folded
    into the weights) is refused."""
    from falconet.convert import convert_hf_to_gguf

    _, base, adapters = falcon
    path = tmp_path / "base-q8_0.gguf"
    convert_hf_to_gguf(base, path, "q8_0")
    gguf = falconet.load(path, adapter=adapters["a"][1])
    assert gguf.adapters is not None  # block weights: not merged
    float_a = falconet.load(base, adapter=adapters["a"][1])
    gguf_base, float_base = falconet.load(path), falconet.load(base)
    base_error = (gguf_base.logits(IDS) - float_base.logits(IDS)).abs().max()
    assert (gguf.logits(IDS) - float_a.logits(IDS)).abs().max() <= 2 * base_error
    for name, (_, folder) in adapters.items():
        gguf_base.add_adapter(name, folder)
    batch_equals_alone(gguf_base)


def test_gguf_falcon_h1_is_refused(tmp_path):
    from falconet.convert import convert_hf_to_gguf

    # no linear biases, gate then norm: a model llama.cpp (so GGUF) can hold
    hf = build_falcon_h1_hf_model(
        "gate_then_norm", dict(mamba_rms_norm=True, mamba_norm_before_gate=False)
    )
    base = save_hf_model(hf, tmp_path / "base")
    make_peft_adapter(hf, tmp_path / "a", ["q_proj"], seed=1)
    convert_hf_to_gguf(base, tmp_path / "h1.gguf", "f32")
    with pytest.raises(AdapterError, match="multipliers folded"):
        falconet.load(tmp_path / "h1.gguf", adapter=tmp_path / "a")


# The recurrent architectures' linear layers PEFT may target (it refuses out_proj and
# conv1d on Mamba-based models).
RECURRENT = {
    "falcon_mamba": (
        lambda: build_falcon_mamba_hf_model("conv4_tied"),
        ["in_proj", "x_proj", "dt_proj"],
    ),
    "falcon_h1": (
        lambda: build_falcon_h1_hf_model(next(iter(FALCON_H1_VARIANTS))),
        [*LLAMA_TARGETS, "in_proj"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("arch", RECURRENT)
def test_recurrent_architectures(arch, tmp_path):
    """Falcon-Mamba and Falcon-H1: the same logits as PEFT's model with the adapter merged
    (transformers' Mamba mixer reads dt_proj.weight directly, so PEFT's unmerged dt_proj
    update is skipped there; merged, it counts, as it does here), and batch == alone."""
    build, targets = RECURRENT[arch]
    hf = build()
    base = save_hf_model(hf, tmp_path / "base")
    a = make_peft_adapter(hf, tmp_path / "a", targets, seed=1)
    make_peft_adapter(hf, tmp_path / "b", targets[:1], seed=2)
    want = peft_logits(a.merge_and_unload(), IDS)
    llm = falconet.load(base)
    llm.add_adapter("a", tmp_path / "a")
    llm.add_adapter("b", tmp_path / "b")
    torch.testing.assert_close(llm.engine().score([IDS], "a")[0], want, rtol=0, atol=1e-4)
    assert (want - peft_logits(hf, IDS)).abs().max() > 0.1
    batch_equals_alone(llm)


def test_unknown_adapter_is_refused(falcon):
    _, base, adapters = falcon
    llm = falconet.load(base)
    with pytest.raises(GenerationError, match="no LoRA adapter named 'zz'"):
        llm.engine().submit([IDS], [SamplingParams()], adapter="zz")
    llm.add_adapter("a", adapters["a"][1])
    with pytest.raises(AdapterError, match="loaded already"):
        llm.add_adapter("a", adapters["a"][1])


def _edit_config(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_malformed_adapter_folders(falcon, llama, tmp_path):
    _, base, adapters = falcon
    good = adapters["a"][1]
    llm = falconet.load(base)

    def refused(folder, needle: str) -> None:
        with pytest.raises(AdapterError, match=needle) as e:
            llm.add_adapter("x", folder)
        assert "\n" not in str(e.value)

    refused(tmp_path / "nowhere", "not a folder")
    no_config = _copy(good, tmp_path / "no_config")
    (no_config / "adapter_config.json").unlink()
    refused(no_config, "no adapter_config.json")
    bad_json = _copy(good, tmp_path / "bad_json")
    (bad_json / "adapter_config.json").write_text("{not json")
    refused(bad_json, "not valid JSON")
    prefix = _copy(good, tmp_path / "prefix")
    _edit_config(prefix, peft_type="PREFIX_TUNING")
    refused(prefix, "peft_type 'PREFIX_TUNING' is not supported")
    dora = _copy(good, tmp_path / "dora")
    _edit_config(dora, use_dora=True)
    refused(dora, "DoRA")
    rank = _copy(good, tmp_path / "rank")
    _edit_config(rank, r=8)
    refused(rank, "rank 8")
    pickled = _copy(good, tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    refused(pickled, "pickle")
    refused(llama[3], "has no linear layer")  # Llama's q_proj on a Falcon base
    other = tmp_path / "other_size"
    make_peft_adapter(build_hf_model("40b", hidden_size=96), other, FALCON_TARGETS, seed=4)
    refused(other, "another model size")
    assert llm.adapters is None  # nothing half-added
