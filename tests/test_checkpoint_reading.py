"""Reading checkpoints: shards, HF-cache symlinks, key prefixes, config dialects, fused and
tied tensors, dtypes, and laziness (headers only until a tensor is asked for)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import LLAMA3_ROPE, make_hf_model, save_checkpoint
from safetensors.torch import load_file, save_file

from edgellm_core.errors import ExportError
from edgellm_core.onnx_graph.builder import GraphBuilder
from edgellm_core.safetensors_file import SafetensorsFile
from edgellm_export.checkpoint import Checkpoint, open_checkpoint
from edgellm_export.checkpoint.reader import canonical_name
from edgellm_export.config import build_model_config
from edgellm_export.contract import get_contract
from edgellm_export.export import ExportOptions, export_checkpoint
from edgellm_export.models import family_for
from edgellm_export.models.weights import WeightSource
from edgellm_validate.validate import validate_export

NO_GOLDEN = ExportOptions(golden=False)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def export_llm(ckpt: Path, out: Path, opts: ExportOptions = NO_GOLDEN) -> Path:
    export_checkpoint(ckpt, out, opts)
    return out / "llm"


def copy_with_weights(src: Path, dst: Path, tensors: dict) -> Path:
    """`src` minus its weights, plus `tensors` as one model.safetensors."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if not p.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copyfile(p, dst / p.name)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """The same bf16 llama saved as one file and as many 200 KB shards, and its plain export."""
    root = tmp_path_factory.mktemp("llama_pair")
    model = make_hf_model("llama", seed=3)
    single = save_checkpoint(model, root / "single")
    sharded = save_checkpoint(model, root / "sharded", max_shard_size="200KB")
    return single, sharded, export_llm(single, root / "single_out")


# -- sharded + HF cache ---------------------------------------------------------------------
def test_sharded_checkpoint_exports_and_validates(llama_pair, tmp_path):
    single, sharded, single_llm = llama_pair
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) >= 4 and not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)

    with open_checkpoint(sharded) as ckpt:
        assert sorted(ckpt.files) == shards
        # Canonical names resolve into several different shards.
        used = {ckpt.ref(n).file.path.name for n in ckpt.names()}
        assert len(used) == len(shards)

    llm = export_llm(sharded, tmp_path / "out", ExportOptions())
    assert validate_export(tmp_path / "out")["passed"]
    # Sharding is invisible in the result.
    assert sha(llm / "model.onnx.data") == sha(single_llm / "model.onnx.data")
    assert sha(llm / "model.onnx") == sha(single_llm / "model.onnx")


def make_hf_cache_snapshot(src: Path, root: Path) -> Path:
    """models--org--name/snapshots/<rev>/<file> -> ../../blobs/<sha256>, as huggingface_hub lays it out."""
    repo = root / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("ab" * 20)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        digest = sha(p)
        shutil.copyfile(p, blobs / digest)
        os.symlink(f"../../blobs/{digest}", snap / p.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ab" * 20)
    return snap


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_hf_cache_snapshot_of_symlinks(layout, llama_pair, tmp_path):
    single, sharded, single_llm = llama_pair
    src = single if layout == "single" else sharded
    snap = make_hf_cache_snapshot(src, tmp_path / "hub")
    files = list(snap.iterdir())
    assert files and all(p.is_symlink() and not os.path.isabs(os.readlink(p)) for p in files)

    plain_llm = single_llm if layout == "single" else export_llm(src, tmp_path / "plain")
    llm = export_llm(snap, tmp_path / "out")
    for name in ("model.onnx.data", "model.onnx", "embedding.safetensors", "config.json"):
        assert sha(llm / name) == sha(plain_llm / name), name
    # The export holds real files, not links back into the cache.
    assert not any(p.is_symlink() for p in llm.rglob("*"))


def test_hf_cache_snapshot_with_a_missing_blob(llama_pair, tmp_path):
    _, sharded, _ = llama_pair
    snap = make_hf_cache_snapshot(sharded, tmp_path / "hub")
    victim = sorted(snap.glob("model-*.safetensors"))[1]
    (snap / os.readlink(victim)).unlink()  # interrupted download: dangling link
    with pytest.raises(ExportError) as ei:
        export_llm(snap, tmp_path / "out")
    assert ei.value.path == str(snap / "model.safetensors.index.json")
    assert victim.name in str(ei.value) and "missing" in str(ei.value)
    assert not (tmp_path / "out").exists()


# -- key prefixes ---------------------------------------------------------------------------
_LINEAR = re.compile(r"(_proj|lm_head)\.weight$")


@pytest.mark.parametrize("peft", [False, True], ids=["language_model", "language_model+peft"])
def test_wrapper_prefixes_are_stripped(peft, llama_pair, tmp_path):
    single, _, single_llm = llama_pair
    tensors = load_file(single / "model.safetensors")
    renamed = {}
    for key, t in tensors.items():
        new = "language_model." + key
        if peft and _LINEAR.search(new):
            new = new[: -len(".weight")] + ".base_layer.weight"
        renamed[new] = t
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in renamed or peft
    assert "language_model.lm_head.weight" in renamed or peft
    if peft:
        assert "language_model.model.layers.1.mlp.down_proj.base_layer.weight" in renamed
        assert "language_model.lm_head.base_layer.weight" in renamed
    ckpt = copy_with_weights(single, tmp_path / "ckpt", renamed)

    with open_checkpoint(ckpt) as c:
        assert c.names() == sorted(canonical_name(k) for k in tensors)
        assert "lm_head.weight" in c.names() and "embed_tokens.weight" in c.names()
    llm = export_llm(ckpt, tmp_path / "out")
    assert sha(llm / "model.onnx.data") == sha(single_llm / "model.onnx.data")
    assert sha(llm / "embedding.safetensors") == sha(single_llm / "embedding.safetensors")


def test_prefix_collision_is_an_error(tmp_path):
    save_file({"model.norm.weight": torch.zeros(4), "language_model.norm.weight": torch.ones(4)},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="ambiguous") as ei:
        Checkpoint(tmp_path)
    assert ei.value.path == str(tmp_path)


# -- config dialects ------------------------------------------------------------------------
def _legacy(rope_parameters: dict) -> dict:
    """The transformers-4 spelling of a transformers-5 `rope_parameters` dict."""
    rest = dict(rope_parameters)
    theta = rest.pop("rope_theta")
    prf = rest.pop("partial_rotary_factor", None)
    out = {"rope_theta": theta, "rope_scaling": None if rest.get("rope_type") == "default" else rest}
    if prf is not None:
        out["partial_rotary_factor"] = prf
    return out


BASE_CFG = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
LLAMA3_500K = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("rope", [
    LLAMA3_500K,
    {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
], ids=["llama3", "default+partial", "linear"])
def test_legacy_and_transformers5_config_agree(rope):
    path = Path("config.json")
    new = build_model_config({**BASE_CFG, "rope_parameters": dict(rope)}, lambda s: False, path)
    old = build_model_config({**BASE_CFG, **_legacy(rope)}, lambda s: False, path)
    assert new == old
    assert new.rope.rope_type == rope["rope_type"] and new.rope.theta == rope["rope_theta"]
    assert new.partial_rotary_factor == rope.get("partial_rotary_factor", 1.0)
    expected = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta", "partial_rotary_factor")}
    assert new.rope.params == expected
    if rope["rope_type"] != "default":
        # Legacy files often say "type" rather than "rope_type".
        legacy = _legacy(rope)
        legacy["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in legacy["rope_scaling"].items()}
        assert build_model_config({**BASE_CFG, **legacy}, lambda s: False, path) == new
    contract = get_contract("0.7")
    assert contract.runtime_config(new) == contract.runtime_config(old)


def test_legacy_config_file_exports_the_same(hf_checkpoints, tmp_path):
    ckpt, _ = hf_checkpoints("llama3rope", "llama", rope_parameters=LLAMA3_ROPE)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "llama3" and "rope_scaling" not in cfg
    legacy_dir = Path(shutil.copytree(ckpt, tmp_path / "legacy"))
    legacy_cfg = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    legacy_cfg.update(_legacy(cfg["rope_parameters"]))
    (legacy_dir / "config.json").write_text(json.dumps(legacy_cfg))

    new_llm = export_llm(ckpt, tmp_path / "new")
    old_llm = export_llm(legacy_dir, tmp_path / "old")
    assert (new_llm / "config.json").read_bytes() == (old_llm / "config.json").read_bytes()
    runtime = json.loads((new_llm / "config.json").read_text())
    assert runtime["rope_theta"] == LLAMA3_ROPE["rope_theta"]
    assert sha(new_llm / "model.onnx") == sha(old_llm / "model.onnx")


@pytest.mark.parametrize("field,value,expected", [
    ("num_key_value_heads", None, 4),  # null means "the default", as in HF
    ("head_dim", None, 64),
    ("max_position_embeddings", None, 4096),
])
def test_config_nulls_take_defaults(field, value, expected):
    cfg = build_model_config({**BASE_CFG, field: value}, lambda s: False, Path("config.json"))
    assert getattr(cfg, field) == expected


@pytest.mark.parametrize("field,value", [("head_dim", "abc"), ("head_dim", -64), ("head_dim", 64.5),
                                         ("hidden_size", "256"), ("num_attention_heads", 0)])
def test_config_bad_values_are_export_errors(field, value):
    with pytest.raises(ExportError) as ei:
        build_model_config({**BASE_CFG, field: value}, lambda s: False, Path("/x/config.json"))
    assert ei.value.path == "/x/config.json" and field in str(ei.value)


# -- fused tensors --------------------------------------------------------------------------
@pytest.mark.parametrize("part,fused,lo,hi", [
    ("self_attn.q_proj", "self_attn.qkv_proj", 0, 256),
    ("self_attn.k_proj", "self_attn.qkv_proj", 256, 384),
    ("self_attn.v_proj", "self_attn.qkv_proj", 384, 512),
    ("mlp.gate_proj", "mlp.gate_up_proj", 0, 512),
    ("mlp.up_proj", "mlp.gate_up_proj", 512, 1024),
])
def test_phi3_fused_rows(part, fused, lo, hi, hf_checkpoints):
    path, _ = hf_checkpoints("phi3")
    stored = load_file(path / "model.safetensors")
    with open_checkpoint(path) as ckpt:
        cfg = build_model_config(ckpt.config, ckpt.has_layer_tensor, ckpt.config_path)
        assert not ckpt.has(f"layers.0.{part}.weight")
        family_for(cfg, ckpt.config_path).prepare(ckpt, cfg)
        for layer in range(cfg.num_hidden_layers):
            ref = ckpt.ref(f"layers.{layer}.{part}.weight")
            whole = stored[f"model.layers.{layer}.{fused}.weight"]
            assert whole.shape[0] == (512 if "qkv" in fused else 1024)
            assert ref.key == f"model.layers.{layer}.{fused}.weight" and ref.rows == (lo, hi)
            assert ref.shape == (hi - lo, 256) and ref.nbytes == (hi - lo) * 256 * 2
            assert torch.equal(ref.view(), whole[lo:hi])
            ref.release()


def test_fused_tensor_with_wrong_row_count(hf_checkpoints, tmp_path):
    path, _ = hf_checkpoints("phi3")
    tensors = load_file(path / "model.safetensors")
    key = "model.layers.1.self_attn.qkv_proj.weight"
    tensors[key] = tensors[key][:-64].clone()
    ckpt = copy_with_weights(path, tmp_path / "ckpt", tensors)
    with pytest.raises(ExportError) as ei:
        export_llm(ckpt, tmp_path / "out")
    assert ei.value.path == str(ckpt / "model.safetensors")
    msg = str(ei.value)
    assert key in msg and "448 rows" in msg and "implies 512" in msg
    assert not (tmp_path / "out").exists()


# -- tied embeddings ------------------------------------------------------------------------
def _initializer(llm: Path, name: str) -> np.ndarray:
    model = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    (init,) = [t for t in model.graph.initializer if t.name == name]
    ext = {e.key: e.value for e in init.external_data}
    with open(llm / ext["location"], "rb") as f:
        f.seek(int(ext["offset"]))
        raw = f.read(int(ext["length"]))
    assert init.data_type == onnx.TensorProto.FLOAT16
    return np.frombuffer(raw, np.float16).reshape(tuple(init.dims))


def test_tied_embeddings_qwen3(hf_checkpoints, tmp_path):
    path, _ = hf_checkpoints("qwen3")
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True
    stored = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in stored
    embed = stored["model.embed_tokens.weight"]
    assert embed.dtype == torch.bfloat16 and embed.shape == (512, 256)

    llm = export_llm(path, tmp_path / "out")
    lm_head = _initializer(llm, "embed_tokens.weight.T")
    assert lm_head.shape == (256, 512)
    np.testing.assert_array_equal(lm_head, embed.to(torch.float16).numpy().T)
    model = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    assert not any("lm_head" in t.name for t in model.graph.initializer)
    emb = load_file(llm / "embedding.safetensors")["embedding"]
    np.testing.assert_array_equal(lm_head, emb.numpy().T)


# -- dtypes ---------------------------------------------------------------------------------
def test_bf16_fp16_fp32_views_are_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.a": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "model.b": torch.randn(3, 9, generator=g).to(torch.float16),
        "model.c": torch.randn(11, generator=g),
        "model.e": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.names() == ["a", "b", "c", "e"]
        for key, t in tensors.items():
            ref = ckpt.ref(key.split(".", 1)[1])
            assert ref.dtype == {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[t.dtype]
            v = ref.view()
            assert v.dtype == t.dtype and torch.equal(v, t)


def _write_raw_safetensors(path: Path, header: dict, data_len: int, pad: int = 8) -> int:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % pad)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + data_len)
    return 8 + len(raw)


def test_unaligned_tensor_data_reads_correctly(tmp_path):
    """Odd header length and a 1-byte tensor first: the F32 data starts at an odd offset."""
    x = torch.arange(6, dtype=torch.float32) * 1.5
    base = _write_raw_safetensors(tmp_path / "model.safetensors", {
        "u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "x": {"dtype": "F32", "shape": [6], "data_offsets": [1, 25]},
    }, 25, pad=1)
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.seek(base + 1)
        f.write(x.numpy().tobytes())
    sf = SafetensorsFile(tmp_path / "model.safetensors")
    assert sf.tensors["x"].start % 4 != 0
    assert torch.equal(sf.view("x"), x)
    sf.close()


@pytest.mark.parametrize("entry,phrase", [
    ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, "negative"),
    ({"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]}, "negative"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "does not match shape"),
    ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}, "unsupported dtype"),
    ({"dtype": "F32", "shape": [2]}, "lacks dtype/shape/data_offsets"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "truncated"),
])
def test_bad_header_entries(entry, phrase, tmp_path):
    _write_raw_safetensors(tmp_path / "w.safetensors", {"t": entry}, 8)
    with pytest.raises(ExportError) as ei:
        SafetensorsFile(tmp_path / "w.safetensors")
    assert ei.value.path == str(tmp_path / "w.safetensors")
    assert phrase in str(ei.value) and "'t'" in str(ei.value)


# -- laziness -------------------------------------------------------------------------------
class _NoRead(Exception):
    pass


def _graph_without_reading(path: Path, monkeypatch):
    """What export_checkpoint does before opening the output: it must read no tensor bytes."""

    def forbidden(*a, **k):
        raise _NoRead("tensor data read while building the graph")

    for attr in ("view", "_mapping"):
        monkeypatch.setattr(SafetensorsFile, attr, forbidden)
    contract = get_contract("0.7")
    ckpt = Checkpoint(path)
    cfg = build_model_config(ckpt.config, ckpt.has_layer_tensor, ckpt.config_path)
    family = family_for(cfg, ckpt.config_path)
    contract.check_supported(cfg)
    family.prepare(ckpt, cfg)
    contract.runtime_config(cfg)
    g = GraphBuilder("edgellm_decoder")
    weights = WeightSource(ckpt, g)
    family.emit_graph(g, weights, cfg, contract, ckpt.has("lm_head.weight"))
    weights.ref("embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
    g.layout_weights()
    g.to_model(contract.DATA_FILE, contract.OPSETS, contract.IR_VERSION)
    return ckpt, cfg, g


@pytest.mark.parametrize("which", ["sharded", "phi3"])
def test_graph_is_built_from_headers_only(which, llama_pair, hf_checkpoints, monkeypatch):
    path = llama_pair[1] if which == "sharded" else hf_checkpoints("phi3")[0]
    ckpt, cfg, g = _graph_without_reading(path, monkeypatch)
    assert len(g.weights) == 9 * cfg.num_hidden_layers + 2  # 7 linears + 2 norms per layer, norm, lm_head
    assert all(sf._map is None and sf._fd is None for sf in ckpt.files.values())
    # The patch is live: producing any weight would have been caught.
    with pytest.raises(_NoRead):
        g.weights[0].produce()
    ckpt.close()


def test_huge_sparse_checkpoint_opens_lazily(tmp_path):
    psutil = pytest.importorskip("psutil")
    rows, cols = 65536, 32768  # F16: exactly 4 GiB
    nbytes = rows * cols * 2
    base = _write_raw_safetensors(tmp_path / "model.safetensors", {
        "__metadata__": {"format": "pt"},
        "model.embed_tokens.weight": {"dtype": "F16", "shape": [rows, cols], "data_offsets": [0, nbytes]},
    }, nbytes)
    st = os.stat(tmp_path / "model.safetensors")
    assert st.st_size == base + nbytes == 4 * 2**30 + base
    if st.st_blocks * 512 > 2**20:
        pytest.skip("this filesystem does not make sparse files")
    (tmp_path / "config.json").write_text(json.dumps(BASE_CFG))

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    ckpt = Checkpoint(tmp_path)
    ref = ckpt.ref("embed_tokens.weight")
    elapsed = time.perf_counter() - t0
    assert ref.shape == (rows, cols) and ref.nbytes == nbytes
    assert elapsed < 0.5, f"opening took {elapsed:.2f} s"
    assert proc.memory_info().rss - rss0 < 50 * 2**20

    # Mapping the whole tensor and reading its last row touches a few pages only.
    view = ref.view()
    assert view.shape == (rows, cols)
    assert float(view[-1].float().abs().sum()) == 0.0
    assert proc.memory_info().rss - rss0 < 50 * 2**20
    del view
    ckpt.close()
    assert os.stat(tmp_path / "model.safetensors").st_blocks * 512 <= 2**20  # still sparse: nothing written
