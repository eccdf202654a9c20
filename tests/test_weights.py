"""Checkpoint loading (falconet/weights/hf.py): sharded and legacy .bin layouts give the
same logits as transformers; damaged or foreign checkpoints raise typed errors that name
the file and the tensor; a bf16 checkpoint stays memory-mapped."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import falconet
from falconet.errors import CheckpointError, ConfigError
from falconet.models.checkpoint import expected_tensors
from falconet.models.falcon import regroup_qkv
from falconet.models.falcon_config import FalconConfig
from tests.conftest import VARIANTS, build_hf_model, hf_config, save_hf_model

PROMPT = [5, 17, 42, 99, 3, 250, 7, 300, 12, 64, 1, 400]
ST = "model.safetensors"
DENSE_4H = "transformer.h.1.mlp.dense_4h_to_h.weight"


@pytest.fixture(scope="module")
def hf_7b():
    return build_hf_model("7b")


@pytest.fixture(scope="module")
def hf_11b():
    return build_hf_model("11b")


@pytest.fixture(scope="module")
def base_7b(hf_7b, tmp_path_factory) -> Path:
    """A single-file 7B checkpoint; tests damage copies of it."""
    return save_hf_model(hf_7b, tmp_path_factory.mktemp("base") / "7b")


@pytest.fixture()
def ckpt(base_7b, tmp_path) -> Path:
    return Path(shutil.copytree(base_7b, tmp_path / "ckpt"))


def max_logit_diff(folder: Path, hf_model) -> float:
    llm = falconet.load(folder, dtype="float32")
    with torch.no_grad():
        ref = hf_model(torch.tensor([PROMPT])).logits[0]
    ours = llm.logits(PROMPT)
    assert ours.shape == ref.shape
    return (ours - ref).abs().max().item()


def state_dict(hf_model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()}


def header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8 : 8 + n])


# ---- layouts that must load ------------------------------------------------------


@pytest.mark.parametrize("variant", ["7b", "40b", "11b", "rw"])
def test_sharded_safetensors(variant, tmp_path):
    hf_model = build_hf_model(variant)
    folder = save_hf_model(hf_model, tmp_path / variant, max_shard_size="20KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    assert not (folder / ST).exists()
    assert max_logit_diff(folder, hf_model) <= 1e-4


def test_sharded_safetensors_through_symlinks(hf_7b, tmp_path):
    """The huggingface_hub cache: snapshots/<rev>/model-0000k.safetensors -> ../../blobs/<sha>."""
    snapshot = save_hf_model(hf_7b, tmp_path / "snapshots" / "rev", max_shard_size="20KB")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in snapshot.glob("*.safetensors"):
        blob = blobs / f"sha-{shard.stem}"
        shutil.move(shard, blob)
        shard.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    assert max_logit_diff(snapshot, hf_7b) <= 1e-4


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy-pickle"])
def test_single_bin(hf_7b, base_7b, tmp_path, zipfile):
    folder = Path(shutil.copytree(base_7b, tmp_path / "bin"))
    (folder / ST).unlink()
    # transformers 5 always writes safetensors, so write the .bin the way older versions did.
    sd = state_dict(hf_7b)
    assert "lm_head.weight" in sd  # tied, but present in old .bin files
    torch.save(sd, folder / "pytorch_model.bin", _use_new_zipfile_serialization=zipfile)
    assert max_logit_diff(folder, hf_7b) <= 1e-4


@pytest.mark.parametrize("variant", ["40b", "11b"])
def test_sharded_bin(variant, tmp_path):
    hf_model = build_hf_model(variant)
    folder = save_hf_model(hf_model, tmp_path / variant)
    (folder / ST).unlink()
    sd = state_dict(hf_model)
    names = sorted(sd)
    weight_map = {}
    for k in range(3):
        part = names[k::3]
        file = f"pytorch_model-0000{k + 1}-of-00003.bin"
        torch.save({n: sd[n] for n in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in sd.values())},
        "weight_map": weight_map,
    }
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert max_logit_diff(folder, hf_model) <= 1e-4


def test_safetensors_preferred_over_bin(hf_7b, ckpt):
    torch.save({"garbage": torch.zeros(1)}, ckpt / "pytorch_model.bin")
    assert max_logit_diff(ckpt, hf_7b) <= 1e-4


def test_tied_head_is_the_embedding(base_7b):
    llm = falconet.load(base_7b, dtype="float32")
    assert llm.config.tie_word_embeddings
    assert llm.model.lm_head.weight is llm.model.transformer.word_embeddings.weight


def test_untied_head_loads_its_own_weights(hf_11b, tmp_path):
    folder = save_hf_model(hf_11b, tmp_path / "11b")
    with safe_open(str(folder / ST), framework="pt") as f:
        assert "lm_head.weight" in list(f.keys())
    llm = falconet.load(folder, dtype="float32")
    head, emb = llm.model.lm_head.weight, llm.model.transformer.word_embeddings.weight
    assert head is not emb and not torch.equal(head, emb)
    assert torch.equal(head, hf_11b.lm_head.weight)
    assert torch.equal(emb, hf_11b.transformer.word_embeddings.weight)
    assert max_logit_diff(folder, hf_11b) <= 1e-4


def test_untied_checkpoint_without_head_is_incomplete(hf_11b, tmp_path):
    folder = save_hf_model(hf_11b, tmp_path / "11b")
    tensors = load_file(folder / ST)
    del tensors["lm_head.weight"]
    save_file(tensors, folder / ST, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.safetensors\) has no tensor lm_head.weight"):
        falconet.load(folder, dtype="float32")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_expected_tensors_match_transformers_state_dict(variant):
    from transformers import FalconForCausalLM

    hf = hf_config(variant)
    with torch.device("meta"):
        model = FalconForCausalLM(hf)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if hf.tie_word_embeddings:
        theirs.pop("lm_head.weight")
    assert expected_tensors(FalconConfig.from_hf(hf.to_dict())) == theirs


def test_progress_reaches_total(base_7b):
    calls = []
    falconet.load(
        base_7b, dtype="float32", progress=lambda done, total: calls.append((done, total))
    )
    done, total = calls[-1]
    assert done == total > 0
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# ---- memory: zero copy and dtype conversion --------------------------------------


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    target, out = str(path.resolve()), []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc/self/maps")
def test_bf16_checkpoint_stays_memory_mapped(tmp_path):
    hf_model = build_hf_model("7b").to(torch.bfloat16)
    folder = save_hf_model(hf_model, tmp_path / "bf16")
    qkv = "transformer.h.0.self_attention.query_key_value.weight"

    def in_file_map(t: torch.Tensor) -> bool:
        return any(lo <= t.data_ptr() < hi for lo, hi in mapped_ranges(folder / ST))

    llm = falconet.load(folder, dtype="bfloat16")
    params = dict(llm.model.named_parameters())
    # The multi-query QKV needs no regrouping, so it is the file's own bytes.
    assert params[qkv].dtype == torch.bfloat16 and in_file_map(params[qkv])
    assert in_file_map(params["transformer.word_embeddings.weight"])
    assert torch.equal(params[qkv], hf_model.transformer.h[0].self_attention.query_key_value.weight)
    # Converted on load (fp32 here) -> a fresh allocation, not the map.
    llm32 = falconet.load(folder, dtype="float32")
    assert not in_file_map(dict(llm32.model.named_parameters())[qkv])


def test_fp32_checkpoint_loaded_as_bf16(hf_7b, base_7b):
    llm = falconet.load(base_7b, dtype="bfloat16")
    sd = hf_7b.state_dict()
    params = dict(llm.model.named_parameters())
    for name in (
        "transformer.word_embeddings.weight",
        DENSE_4H,
        "transformer.h.0.self_attention.query_key_value.weight",
    ):
        assert params[name].dtype == torch.bfloat16
        assert torch.equal(params[name], sd[name].to(torch.bfloat16))
    # Every parameter has the dtype the model declared for it; none is left fp32 by accident.
    matmul = [p for n, p in params.items() if n.endswith(".weight") and p.dim() == 2]
    assert matmul and all(p.dtype == torch.bfloat16 for p in matmul)


def test_grouped_qkv_regrouped_on_load(tmp_path):
    hf_model = build_hf_model("40b")
    folder = save_hf_model(hf_model, tmp_path / "40b")
    llm = falconet.load(folder, dtype="float32")
    name = "transformer.h.1.self_attention.query_key_value.weight"
    want = regroup_qkv(hf_model.state_dict()[name], llm.config)
    assert torch.equal(dict(llm.model.named_parameters())[name], want)
    # 8 heads, 2 kv heads, head_dim 8: rows of q head 2 come from group 0, slot 2.
    original = hf_model.state_dict()[name].reshape(2, 4 + 2, 8, -1)
    assert torch.equal(want[2 * 8 : 3 * 8], original[0, 2])
    assert torch.equal(want[8 * 8 : 9 * 8], original[0, 4])  # first k head
    assert torch.equal(want[10 * 8 : 11 * 8], original[0, 5])  # first v head


# ---- damaged safetensors ---------------------------------------------------------


def test_truncated_in_half(ckpt):
    path = ckpt / ST
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(
        CheckpointError, match=r"model.safetensors.*truncated.*tensor transformer\.\S+ .*cut off"
    ):
        falconet.load(ckpt, dtype="float32")


def test_truncated_last_100_bytes_names_the_last_tensor(ckpt):
    path = ckpt / ST
    n, head = header(path)
    last = max((k for k in head if k != "__metadata__"), key=lambda k: head[k]["data_offsets"][1])
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(CheckpointError) as e:
        falconet.load(ckpt, dtype="float32")
    msg = str(e.value)
    assert str(path) in msg and f"tensor {last} is cut off" in msg
    assert f"{len(raw) - 100} bytes of {len(raw)}" in msg


def test_missing_tensor(ckpt):
    tensors = load_file(ckpt / ST)
    del tensors[DENSE_4H]
    save_file(tensors, ckpt / ST, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"\(model.safetensors\) has no tensor {DENSE_4H}"):
        falconet.load(ckpt, dtype="float32")


@pytest.mark.parametrize(
    ("name", "change", "shape"),
    [
        ("transformer.h.0.mlp.dense_h_to_4h.weight", lambda t: t.t().contiguous(), "(64, 256), expected (256, 64)"),
        ("transformer.word_embeddings.weight", lambda t: t[:-1].clone(), "(447, 64), expected (448, 64)"),
        ("transformer.h.1.self_attention.query_key_value.weight", lambda t: torch.cat([t, t[:16]]),
         "(112, 64), expected (96, 64)"),
        ("transformer.ln_f.bias", lambda t: t[None], "(1, 64), expected (64,)"),
    ],
    ids=["transposed", "vocab-447", "qkv-as-mha", "extra-dim"],
)  # fmt: skip
def test_wrong_shape(ckpt, name, change, shape):
    tensors = load_file(ckpt / ST)
    tensors[name] = change(tensors[name])
    save_file(tensors, ckpt / ST, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        falconet.load(ckpt, dtype="float32")
    msg = str(e.value)
    assert str(ckpt / ST) in msg and f"tensor {name} has shape {shape}" in msg


def test_unexpected_tensor(ckpt):
    tensors = load_file(ckpt / ST)
    tensors["transformer.h.0.ln_attn.weight"] = torch.ones(64)  # a 40B norm in a 7B checkpoint
    save_file(tensors, ckpt / ST, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: unexpected tensor transformer.h.0.ln_attn.weight",
    ):
        falconet.load(ckpt, dtype="float32")


def test_ignored_buffers_are_skipped(hf_7b, ckpt):
    tensors = load_file(ckpt / ST)
    tensors["transformer.h.0.self_attention.maybe_rotary.inv_freq"] = torch.ones(4)
    save_file(tensors, ckpt / ST, metadata={"format": "pt"})
    assert max_logit_diff(ckpt, hf_7b) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_integer_tensor_where_float_expected(ckpt, dtype):
    tensors = load_file(ckpt / ST)
    tensors[DENSE_4H] = torch.ones_like(tensors[DENSE_4H], dtype=dtype)
    save_file(tensors, ckpt / ST, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=rf"model.safetensors: tensor {DENSE_4H} has dtype {dtype}"
    ):
        falconet.load(ckpt, dtype="float32")


def header_len_too_big(raw: bytes) -> bytes:
    return (len(raw) * 2).to_bytes(8, "little") + raw[8:]


def header_len_off_by_8(raw: bytes) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    return (n - 8).to_bytes(8, "little") + raw[8:]


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: os.urandom(len(raw)),
        lambda raw: b"",
        lambda raw: raw[:5],
        header_len_too_big,
        header_len_off_by_8,
        lambda raw: raw[:8] + b"[" + raw[9:],  # header not a JSON object
    ],
    ids=[
        "random-bytes",
        "empty",
        "5-bytes",
        "header-len-too-big",
        "header-len-short",
        "header-not-json",
    ],
)
def test_unreadable_safetensors(ckpt, damage):
    path = ckpt / ST
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=rf"{ST}: not a readable safetensors file"):
        falconet.load(ckpt, dtype="float32")


# ---- bad folders and configs -----------------------------------------------------


def test_non_falcon_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    with pytest.raises(
        ConfigError, match=r"config.json: config: model_type 'mistral' is not a Falcon model"
    ):
        falconet.load(ckpt)
    # llama is a model type falconet runs (Falcon3), so Falcon weights do not fit it
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor transformer\.\S+; the checkpoint does not match"
    ):
        falconet.load(ckpt)


def test_config_not_json_or_missing(ckpt):
    (ckpt / "config.json").write_text("{'model_type': 'falcon'}")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        falconet.load(ckpt)
    (ckpt / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config.json: config: expected a JSON object, got list"):
        falconet.load(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config.json: no config.json"):
        falconet.load(ckpt)


def test_folder_without_weights(ckpt):
    (ckpt / ST).unlink()
    with pytest.raises(CheckpointError, match=rf"{ckpt}: no model.safetensors"):
        falconet.load(ckpt)


def test_config_that_does_not_match_the_weights(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(
        CheckpointError,
        match=r"unexpected tensor transformer.h.1.\S+; the checkpoint does not match",
    ):
        falconet.load(ckpt)


@pytest.fixture()
def sharded(hf_7b, tmp_path) -> Path:
    return save_hf_model(hf_7b, tmp_path / "sharded", max_shard_size="20KB")


def edit_index(folder: Path, edit) -> Path:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))
    return path


def test_index_lists_missing_shard(sharded):
    edit_index(sharded, lambda wm: wm.update({DENSE_4H: "model-00042-of-00009.safetensors"}))
    with pytest.raises(
        CheckpointError,
        match=r"index.json: lists model-00042-of-00009.safetensors, which is not a file",
    ):
        falconet.load(sharded)


@pytest.mark.parametrize(
    "entry", ["../x.safetensors", "sub/../../x.safetensors", "{abs}", "", 7, None]
)
def test_index_entry_outside_the_folder(sharded, entry):
    outside = sharded.parent / "x.safetensors"
    shutil.copy(
        next(sharded.glob("model-*.safetensors")), outside
    )  # a real file, so only the path is wrong
    entry = str(outside) if entry == "{abs}" else entry
    edit_index(sharded, lambda wm: wm.update({DENSE_4H: entry}))
    with pytest.raises(
        CheckpointError, match=rf"index.json: lists {entry!r}, which is not a file name inside"
    ):
        falconet.load(sharded)


@pytest.mark.parametrize(
    "text",
    ['{"weight_map": ["model-00001-of-00009.safetensors"]}', '{"metadata": {}}', "not json", "[]"],
    ids=["weight-map-list", "no-weight-map", "not-json", "list"],
)
def test_malformed_index(sharded, text):
    (sharded / "model.safetensors.index.json").write_text(text)
    with pytest.raises(
        CheckpointError, match=r"model.safetensors.index.json: not a valid weight index"
    ):
        falconet.load(sharded)


def test_tensor_in_two_shards(sharded):
    shards = sorted(sharded.glob("model-*.safetensors"))
    extra = load_file(shards[0])
    name = next(iter(extra))
    save_file({name: extra[name]}, sharded / "model-extra.safetensors", metadata={"format": "pt"})
    edit_index(sharded, lambda wm: wm.update({"zzz.marker": "model-extra.safetensors"}))
    with pytest.raises(
        CheckpointError,
        match=rf"model-extra.safetensors: tensor {name} also appears in .*{shards[0].name}",
    ):
        falconet.load(sharded)


# ---- hostile and broken .bin files -----------------------------------------------


class RunsShell:
    """Unpickling this runs a shell command (what a hostile pytorch_model.bin does)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_bin_with_code_payload_is_refused_and_not_run(hf_7b, ckpt, tmp_path):
    (ckpt / ST).unlink()
    marker = tmp_path / "payload-ran"
    sd = state_dict(hf_7b)
    sd["transformer.h.0.self_attention.dense.weight"] = RunsShell(
        f"touch {shlex.quote(str(marker))}"
    )
    torch.save(sd, ckpt / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match=r"pytorch_model.bin: holds pickled Python objects.*GLOBAL"
    ):
        falconet.load(ckpt, dtype="float32")
    assert not marker.exists()
    if sys.platform.startswith("linux"):  # the payload is live: an unsafe load would have run it
        torch.load(ckpt / "pytorch_model.bin", weights_only=False)
        assert marker.exists()


def test_bin_with_plain_class_instance(ckpt):
    (ckpt / ST).unlink()
    torch.save(
        {"transformer.word_embeddings.weight": RunsShell("true")}, ckpt / "pytorch_model.bin"
    )
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: holds pickled Python objects"):
        falconet.load(ckpt)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ([torch.zeros(2)], r"expected a dict of tensors, got list"),
        ({DENSE_4H: 3}, rf"entry {DENSE_4H} is a int, not a tensor"),
        ({"state_dict": {DENSE_4H: torch.zeros(2)}}, r"entry state_dict is a dict, not a tensor"),
    ],
    ids=["list", "int-entry", "nested"],
)
def test_bin_with_non_tensor_entries(ckpt, payload, match):
    (ckpt / ST).unlink()
    torch.save(payload, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=rf"pytorch_model.bin: {match}"):
        falconet.load(ckpt)


def test_truncated_bin(hf_7b, ckpt):
    (ckpt / ST).unlink()
    torch.save(state_dict(hf_7b), ckpt / "pytorch_model.bin")
    raw = (ckpt / "pytorch_model.bin").read_bytes()
    (ckpt / "pytorch_model.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(
        CheckpointError, match=r"pytorch_model.bin: not a loadable PyTorch weights file"
    ):
        falconet.load(ckpt)


def test_bin_integer_tensor(hf_7b, ckpt):
    (ckpt / ST).unlink()
    sd = state_dict(hf_7b)
    sd[DENSE_4H] = sd[DENSE_4H].to(torch.int64)
    torch.save(sd, ckpt / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match=rf"pytorch_model.bin: tensor {DENSE_4H} has dtype torch.int64"
    ):
        falconet.load(ckpt)
