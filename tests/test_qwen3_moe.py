"""Qwen3-MoE with FP16/BF16 experts, exported in standard ONNX ops (0.7.1 has no FP16 MoE plugin):
the layer plan, exact top-k routing, and the twin against HF transformers on a tiny model.

Near ties: fp16 router logits cannot order two experts whose probabilities differ by less than ~1e-2,
so HF's routing is checked first to have no such step; a fixture that had one would make this test
say so instead of failing on noise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_hf_model, save_checkpoint
from fixtures.moe_reference import check_twin_against_hf, hf_logits_with_router_margins, softmax_margin
from onnx import load as onnx_load

from edgellm_export.config import build_model_config
from edgellm_validate.validate import validate_export

MOE = dict(head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, decoder_sparse_step=1,
           mlp_only_layers=[1], norm_topk_prob=True, num_hidden_layers=3)


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    model = make_hf_model("qwen3_moe", seed=3, **MOE)
    with torch.no_grad():  # a router with some conviction: top-k decisions far from fp16 noise
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.mul_(8.0)
    return save_checkpoint(model, tmp_path_factory.mktemp("moe") / "ckpt"), model


def hf_per_sequence(model, llm):
    """HF logits for every golden step (one full sequence at a time) and, per (scenario, batch row), the
    smallest router-logit gap between the k-th and (k+1)-th expert over every token and MoE layer."""
    routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    return hf_logits_with_router_margins(model, llm, routers, softmax_margin(MOE["num_experts_per_tok"]))


NEAR_TIE = 1e-2


def test_layer_plan_follows_sparse_step_and_mlp_only_layers():
    raw = {"model_type": "qwen3_moe", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 6,
           "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64, "num_local_experts": 4,
           "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    cfg = build_model_config(raw, lambda s: False, None)
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]


def test_graph_routes_in_standard_ops_and_matches_transformers(moe_checkpoint, tmp_path):
    from edgellm_export.export import ExportOptions, export_checkpoint

    ckpt, model = moe_checkpoint
    out = tmp_path / "out"
    export_checkpoint(ckpt, out, ExportOptions())
    llm = out / "llm"
    ref, margins = hf_per_sequence(model, llm)
    stats = check_twin_against_hf(llm, ref, margins, near_tie=NEAR_TIE, min_cosine=0.999)
    assert stats["rows"] >= 15 and stats["top1"] == stats["rows"]
    graph = onnx_load(str(llm / "model.onnx"), load_external_data=False).graph
    assert {n.domain for n in graph.node} <= {"", "trt_edgellm"}
    assert [n.op_type for n in graph.node].count("TopK") == 2  # layers 0 and 2; layer 1 is dense
    assert not any("Moe" in n.op_type for n in graph.node)
    dims = {i.name: list(i.dims) for i in graph.initializer if i.name.endswith(".stacked")}
    h = model.config.hidden_size
    assert dims["layers.0.mlp.experts.gate_proj.stacked"] == [8, h, 128]
    assert dims["layers.0.mlp.experts.down_proj.stacked"] == [8, 128, h]
    assert "layers.1.mlp.experts.gate_proj.stacked" not in dims
    res = validate_export(out)
    assert res["passed"], res["failures"]
    assert json.loads((llm / "config.json").read_text())["model"] == "qwen3_moe"


def test_stacked_experts_equal_the_checkpoint(moe_checkpoint, tmp_path):
    """Each [E, H, I] stack holds expert e's checkpoint weight `[I, H]`, transposed, at index e (read
    back from model.onnx.data, compared with the safetensors tensors by name)."""
    import onnx
    from onnx import numpy_helper
    from safetensors.torch import load_file

    from edgellm_export.cli import main

    ckpt, _ = moe_checkpoint
    out = tmp_path / "out"
    assert main(["-q", "export", "--no-golden", str(ckpt), str(out)]) == 0
    m = onnx.load(str(out / "llm" / "model.onnx"))
    init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    tensors = load_file(str(ckpt / "model.safetensors"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        got = init[f"layers.2.mlp.experts.{proj}.stacked"]
        for e in range(8):
            want = tensors[f"model.layers.2.mlp.experts.{e}.{proj}.weight"].t().to(torch.float16).numpy()
            np.testing.assert_array_equal(got[e], want)


def test_quantized_experts_are_refused_by_name():
    """INT4/NVFP4 experts need the runtime's MoE plugins, not exported yet: refused, never run as FP16."""
    from pathlib import Path
    from types import SimpleNamespace

    from edgellm_core.errors import UnsupportedError
    from edgellm_core.onnx_graph.builder import FLOAT16, GraphBuilder
    from edgellm_export.models.blocks import moe
    from edgellm_export.quant.plan import QuantDecisions

    raw = {"model_type": "qwen3_moe", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64, "num_experts": 4,
           "num_experts_per_tok": 2, "moe_intermediate_size": 32}
    cfg = build_model_config(raw, lambda s: False, Path("config.json"))
    g = GraphBuilder("t")
    quant = QuantDecisions()
    quant.linears = {"layers.0.mlp.experts.3.up_proj": SimpleNamespace(format="int4_awq_gemm")}
    e = SimpleNamespace(g=g, w=None, cfg=cfg, quant=quant)
    x = g.input("x", FLOAT16, ["b", "s", 128])
    with pytest.raises(UnsupportedError, match=r"layers\.0\.mlp\.experts\.3\.up_proj: quantized MoE experts"):
        moe.emit(e, 0, x)


@pytest.mark.parametrize("change, words", [
    # the config claims more experts than the files hold: the router's shape says so first
    ({"num_experts": 16}, ["mlp.gate.weight", "[8, 256]", "[16, 256]"]),
    ({"num_experts_per_tok": 9}, ["num_experts_per_tok (9) exceeds num_experts (8)"]),
    ({"moe_intermediate_size": 96}, ["experts.0.", "shape"]),
])
def test_experts_inconsistent_with_the_config_are_refused(moe_checkpoint, tmp_path, capsys, change, words):
    """Exit 2, one paragraph naming the file and the problem, nothing written."""
    import shutil

    from edgellm_export.cli import main

    ckpt = tmp_path / "ckpt"
    shutil.copytree(moe_checkpoint[0], ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    raw.update(change)
    (ckpt / "config.json").write_text(json.dumps(raw))
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
