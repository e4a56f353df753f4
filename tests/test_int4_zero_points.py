"""Asymmetric INT4 zero points (AutoAWQ GEMM, GPTQ `sym: false` v1 and v2) export exactly.

The plugin has no zero-point input; a layer whose `q - z` leaves [-8, 7] gets the split
`q - z = (U - 8) + d` and a correction `GroupMean(x) @ (128 * d * s)` added to the plugin's output.
The fixtures' zeros take every nibble value; v_proj keeps zeros that fit, so it must keep the plain
graph. Expected integers are decoded here from the checkpoint with the documented formats (quant.md
§3.6, §3.7), not with the exporter's code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import hf_reference_logits
from fixtures import dequant_reference as ref
from fixtures.dequant_reference import reference_model
from fixtures.quant_layouts import FITTING, make_layout_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edgellm_export.cli import main
from edgellm_export.quant import int4_pack
from edgellm_validate.compare import cosine_rows, thresholds
from edgellm_validate.cpu_backend import CpuBackend
from edgellm_validate.twin import run_twin
from edgellm_validate.validate import validate_export

KINDS = {"awq_gemm_zeros": "int4_awq_gemm", "gptq_v1_zeros": "int4_gptq", "gptq_v2_zeros": "int4_gptq"}
H, FF, KV, G = 256, 512, 128, 128
LINEARS = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (KV, H), "self_attn.v_proj": (KV, H),
           "self_attn.o_proj": (H, H), "mlp.gate_proj": (FF, H), "mlp.up_proj": (FF, H), "mlp.down_proj": (H, FF)}
NAMES = [(f"layers.{i}.{lin}", nk) for i in range(2) for lin, nk in LINEARS.items()]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero_points")
    made = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in made:
            ckpt = make_layout_checkpoint(kind, root / f"{kind}-ckpt")
            out = root / f"{kind}-out"
            assert main(["-q", "export", str(ckpt), str(out)]) == 0
            made[kind] = (ckpt, out)
        return made[kind]

    return get


def _inits(out: Path) -> dict[str, np.ndarray]:
    """Every external initializer, read from model.onnx.data by its external-data record."""
    m = onnx.load(str(out / "llm" / "model.onnx"), load_external_data=False)
    arrays = {}
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if not ext:
            continue
        raw = np.fromfile(out / "llm" / ext["location"], np.uint8, int(ext["length"]), offset=int(ext["offset"]))
        arrays[t.name] = raw.view(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(list(t.dims))
    return arrays


def _checkpoint_ints(f, key: str, kind: str, n: int, k: int):
    """(q [K, N], true zeros [G, N], fp16 scales [G, N], g_idx [K]) as the producers define them."""
    if kind == "awq_gemm_zeros":
        q = ref._nibbles_along_last(f.get_tensor(f"{key}.qweight"), ref.AWQ_ORDER)
        z = ref._nibbles_along_last(f.get_tensor(f"{key}.qzeros"), ref.AWQ_ORDER)
    else:
        qw = f.get_tensor(f"{key}.qweight").view(np.uint32)
        q = np.stack([(qw >> np.uint32(4 * j)) & 15 for j in range(8)], 1).reshape(k, n).astype(np.int64)
        z = ref._nibbles_along_last(f.get_tensor(f"{key}.qzeros")) + (1 if kind == "gptq_v1_zeros" else 0)
    g_idx = f.get_tensor(f"{key}.g_idx").astype(np.int64) if kind == "gptq_v1_zeros" else np.arange(k) // G
    return q, z, f.get_tensor(f"{key}.scales").astype(np.float16), g_idx


@pytest.mark.parametrize("kind", list(KINDS))
def test_exported_integers_and_corrections_are_what_the_checkpoint_implies(kind, exported):
    """Read back from model.onnx.data: plugin nibbles and fp16 corrections, bit for bit."""
    ckpt, out = exported(kind)
    arrays = _inits(out)
    f = safe_open(str(ckpt / "model.safetensors"), "np")
    corrected = 0
    for p, (n, k) in NAMES:
        q, z, s, g_idx = _checkpoint_ints(f, f"model.{p}", kind, n, k)
        if not p.endswith(FITTING):  # the fixture's premise: every nibble value is a zero
            stored = z - (1 if kind == "gptq_v1_zeros" else 0)
            assert sorted(set(stored.ravel().tolist())) == list(range(16)), p
        perm = arrays.get(f"{p}.act_perm", np.arange(k))
        assert (f"{p}.act_perm" in arrays) == (kind == "gptq_v1_zeros")
        assert np.array_equal(g_idx[perm], np.arange(k) // G)  # groups contiguous in the plugin's order
        u = int4_pack.unpack_plugin(arrays[f"{p}.qweight"].view(np.uint8), n, k).astype(np.int64) - 8
        qp, zp = q[perm], z[g_idx[perm]]
        # The zero nearest the checkpoint's that keeps q - c in [-8, 7] (the interval always holds 8).
        qg = qp.reshape(k // G, G, n)
        c = np.clip(z, qg.max(1) - 7, qg.min(1) + 8)
        d = c - z
        assert np.array_equal(u, (qp - c[np.arange(k) // G]).T), p
        assert np.array_equal(u + d[np.arange(k) // G].T, (qp - zp).T), p  # exact: q - z = (U - 8) + d
        if p.endswith(FITTING):
            assert not d.any() and f"{p}.zero_correction" not in arrays, p
            continue
        assert d.any() and (d == 0).any(), p  # some groups need the correction, some fit
        want = (np.float32(G) * d.astype(np.float32) * s.astype(np.float32)).astype(np.float16)
        assert np.array_equal(arrays[f"{p}.zero_correction"].view(np.uint16), want.view(np.uint16)), p
        corrected += 1
    assert corrected == 12


class Graph:
    def __init__(self, out: Path):
        self.m = onnx.load(str(out / "llm" / "model.onnx"), load_external_data=False)
        self.producer = {o: nd for nd in self.m.graph.node for o in nd.output}
        self.consumers: dict[str, list] = {}
        for nd in self.m.graph.node:
            for i in nd.input:
                self.consumers.setdefault(i, []).append(nd)
        self.inits = {t.name for t in self.m.graph.initializer}

    def plugin(self, p: str):
        (nd,) = self.consumers[f"{p}.qweight"]
        assert nd.op_type == "Int4GroupwiseGemmPlugin"
        return nd

    def group_mean_of(self, value: str, k: int) -> str:
        """The x whose fp16 group means `value` is: Cast(fp32) -> Reshape [0, 0, K/G, G] -> ReduceMean(-1)
        -> Cast(fp16)."""
        cast16 = self.producer[value]
        mean = self.producer[cast16.input[0]]
        reshape = self.producer[mean.input[0]]
        cast32 = self.producer[reshape.input[0]]
        assert [cast16.op_type, mean.op_type, reshape.op_type, cast32.op_type] == \
            ["Cast", "ReduceMean", "Reshape", "Cast"]
        assert cast16.attribute[0].i == onnx.TensorProto.FLOAT16 and cast32.attribute[0].i == onnx.TensorProto.FLOAT
        assert [(a.name, a.i) for a in mean.attribute] == [("keepdims", 0)]
        assert self.const(mean.input[1]) == [-1] and self.const(reshape.input[1]) == [0, 0, k // G, G]
        return cast32.input[0]

    def const(self, name: str) -> list:
        return onnx.numpy_helper.to_array(next(t for t in self.m.graph.initializer if t.name == name)).tolist()


@pytest.mark.parametrize("kind", list(KINDS))
def test_graph_adds_the_correction_only_where_a_zero_does_not_fit(kind, exported):
    _, out = exported(kind)
    g = Graph(out)
    means = {}
    for p, (_n, k) in NAMES:
        plugin = g.plugin(p)
        users = g.consumers[plugin.output[0]]
        if p.endswith(FITTING):  # the plain fold's graph: nothing between the plugin and its user
            assert f"{p}.zero_correction" not in g.inits
            assert all(u.op_type != "Add" or g.producer[u.input[1]].op_type != "MatMul" for u in users), p
            continue
        (add,) = users
        assert add.op_type == "Add" and add.input[0] == plugin.output[0]
        mm = g.producer[add.input[1]]
        assert mm.op_type == "MatMul" and mm.input[1] == f"{p}.zero_correction"
        assert g.group_mean_of(mm.input[0], k) == plugin.input[0], p  # means of the plugin's own input
        means[p] = mm.input[0]
    if kind != "gptq_v1_zeros":  # siblings reading one input share one group mean
        for i in range(2):
            assert means[f"layers.{i}.self_attn.q_proj"] == means[f"layers.{i}.self_attn.k_proj"]
            assert means[f"layers.{i}.mlp.gate_proj"] == means[f"layers.{i}.mlp.up_proj"]
    assert sum(nd.op_type == "ReduceMean" for nd in g.m.graph.node) == 5 + len(set(means.values()))


@pytest.mark.parametrize("kind", list(KINDS))
def test_twin_reproduces_golden_and_stays_at_the_int4_bound_of_a_dequantized_reference(kind, exported):
    ckpt, out = exported(kind)
    res = validate_export(out)
    llm = out / "llm"
    precision = json.loads((llm / "golden" / "bundle.json").read_text())["precision"]
    assert precision == KINDS[kind]
    assert res["passed"], res["failures"]
    assert res["worst_cosine"] >= 0.9999 and res["top1_agreement"] == 1.0
    want = hf_reference_logits(reference_model(ckpt), llm)
    run = run_twin(llm, CpuBackend(llm))
    worst = min(float(cosine_rows(s.logits, want[(s.scenario, s.index)]).min()) for s in run.steps)
    print(f"\n{kind}: golden cos {res['worst_cosine']:.7f}; dequantized reference cos {worst:.6f}")
    assert worst >= thresholds(precision)[2]


def test_one_group_beyond_the_signed_range_adds_one_correction(tmp_path):
    """What the exporter used to refuse: a single zero of 1 with q = 15 in layer 1's down_proj. Only
    that layer gains a correction, nonzero in that one group and channel; the rest is unchanged."""
    src = make_layout_checkpoint("awq_gemm", tmp_path / "src")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    state = load_file(str(ckpt / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj"
    z = state[f"{key}.qzeros"].numpy().view(np.uint32).copy()
    q = state[f"{key}.qweight"].numpy().view(np.uint32).copy()
    z[0, 0] = (z[0, 0] & ~np.uint32(0xF)) | np.uint32(1)  # bit field 0 = channel 0
    q[0, 0] = (q[0, 0] & ~np.uint32(0xF)) | np.uint32(15)  # q - z = 14 at k = 0
    state[f"{key}.qzeros"] = torch.from_numpy(z.view(np.int32))
    state[f"{key}.qweight"] = torch.from_numpy(q.view(np.int32))
    save_file(state, str(ckpt / "model.safetensors"))
    outs = {}
    for name, c in (("src", src), ("ckpt", ckpt)):
        outs[name] = tmp_path / f"{name}-out"
        assert main(["-q", "export", str(c), str(outs[name])]) == 0
    before, after = _inits(outs["src"]), _inits(outs["ckpt"])
    p = "layers.1.mlp.down_proj"
    assert sorted(set(after) - set(before)) == [f"{p}.zero_correction"]
    assert all(np.array_equal(before[n], after[n]) for n in before if n != f"{p}.qweight")
    corr = after[f"{p}.zero_correction"].astype(np.float32)
    qg = ref._nibbles_along_last(state[f"{key}.qweight"].numpy(), ref.AWQ_ORDER)[:G, 0]
    c = np.clip(1, qg.max() - 7, qg.min() + 8)  # the zero nearest 1 that keeps q - c in [-8, 7]
    s = state[f"{key}.scales"].numpy()[0, 0]
    assert np.count_nonzero(corr) == 1 and corr[0, 0] == np.float16(G * (c - 1) * np.float32(s))
    assert validate_export(outs["ckpt"])["passed"]


def test_modelopt_w4a16_with_zero_points_is_refused(tmp_path, capsys):
    """ModelOpt's W4A16 export is symmetric (signed nibbles, `has_zero_point: false`); a file that says
    otherwise names a layout no producer writes."""
    from test_quant_plan import fp8_checkpoint, quant_json

    ckpt = fp8_checkpoint(tmp_path / "src")
    quant_json(ckpt, {"quant_algo": "W4A16_AWQ", "group_size": 128, "has_zero_point": True})
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "hf_quant_config.json" in err and "has_zero_point" in err
