"""Nemotron-H's sigmoid-routed MoE block (models/blocks/sigmoid_moe.py), both faces.

1. The eager face against transformers' `NemotronHMoE` (fp32) on tiny configs covering the group stage
   (n_group 1, 2, 4; topk_group 1, 2), renormalisation on and off, and a routed scaling factor, with a
   correction bias large enough to change choices. The block's router logits are rounded to fp16 (the
   runtime's plain fp16 router), so a token whose routing is a near tie in HF's fp32 (the k-th vs (k+1)-th
   masked choice, or the kept vs the first dropped group, within 1e-3) may legitimately route elsewhere:
   such tokens are counted and left out, the rest must select HF's experts and match its output.
2. The graph face, emitted over a real WeightSource on a tiny safetensors checkpoint and run in
   onnxruntime (fp16 arithmetic widened as the CPU backend does), against the eager face over the same
   initializers: within 1 fp16 ulp, same experts.
3. Quantized experts are refused by name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edgellm_core.errors import UnsupportedError
from edgellm_core.onnx_graph.builder import FLOAT16, GraphBuilder
from edgellm_export.config import SigmoidMoeSpec, build_model_config
from edgellm_export.models.blocks import sigmoid_moe
from edgellm_export.quant.plan import QuantDecisions

E, K, INTER, SHARED = 8, 2, 32, 48
TIE = 1e-3
# (hidden, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
CASES = {
    "g2 k1 norm": (64, 2, 1, True, 1.0),
    "g4 k2 raw x2.5": (128, 4, 2, False, 2.5),
    "g4 k1 norm x2.5": (96, 4, 1, True, 2.5),
    "g2 k2 (all kept) raw": (64, 2, 2, False, 1.0),
    "ungrouped norm": (64, 1, 1, True, 1.0),
}


def _cfg(hidden: int, n_group: int, topk_group: int, norm: bool, scale: float):
    raw = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64}
    base = build_model_config(raw, lambda s: False, Path("config.json"))
    spec = SigmoidMoeSpec(num_experts=E, top_k=K, intermediate_size=INTER, shared_intermediate_size=SHARED,
                          n_group=n_group, topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=scale)
    return dataclasses.replace(base, sigmoid_moe=spec)


def _hf_moe(hidden, n_group, topk_group, norm, scale, seed=0):
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

    hf_cfg = NemotronHConfig(hidden_size=hidden, n_routed_experts=E, num_experts_per_tok=K,
                             moe_intermediate_size=INTER, moe_shared_expert_intermediate_size=SHARED,
                             n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
                             routed_scaling_factor=scale, mlp_hidden_act="relu2", mlp_bias=False)
    moe = NemotronHMoE(hf_cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        moe.gate.weight.copy_(torch.randn(E, hidden, generator=gen) * 1.5 / hidden**0.5)
        # Around 2.5 (an fp16 step of 2e-3 there), spread 0.6: moves many choices (asserted below).
        moe.gate.e_score_correction_bias.copy_(2.5 + 0.6 * (torch.rand(E, generator=gen) - 0.5))
        moe.experts.up_proj.copy_(torch.randn(E, INTER, hidden, generator=gen) / hidden**0.5)
        moe.experts.down_proj.copy_(torch.randn(E, hidden, INTER, generator=gen) / INTER**0.5)
        moe.shared_experts.up_proj.weight.copy_(torch.randn(SHARED, hidden, generator=gen) / hidden**0.5)
        moe.shared_experts.down_proj.weight.copy_(torch.randn(hidden, SHARED, generator=gen) / SHARED**0.5)
    return moe


def _tensors(moe) -> dict:
    """The HF module's parameters as the exporter's initializers (fp16, `[in, out]`, experts stacked)."""
    return {
        "mlp.gate.weight.T": moe.gate.weight.detach().t().half(),
        "mlp.gate.e_score_correction_bias": moe.gate.e_score_correction_bias.detach().float().clone(),
        "mlp.experts.up_proj.stacked": moe.experts.up_proj.detach().transpose(1, 2).half().contiguous(),  # [E,H,I]
        "mlp.experts.down_proj.stacked": moe.experts.down_proj.detach().transpose(1, 2).half().contiguous(),
        "mlp.shared_experts.up_proj.weight.T": moe.shared_experts.up_proj.weight.detach().t().half(),
        "mlp.shared_experts.down_proj.weight.T": moe.shared_experts.down_proj.weight.detach().t().half(),
    }


def _hf_near_ties(moe, x2) -> torch.Tensor:
    """Per token: does HF's fp32 routing hold a near tie (top-k cut or group cut within TIE)?"""
    g = moe.gate
    scores = torch.sigmoid(x2 @ g.weight.t())
    choice = scores + g.e_score_correction_bias
    tie = torch.zeros(x2.shape[0], dtype=torch.bool)
    if g.topk_group < g.num_group:
        groups = choice.view(-1, g.num_group, E // g.num_group).topk(2, dim=-1).values.sum(-1)
        gs = groups.sort(dim=-1, descending=True).values
        tie |= (gs[:, g.topk_group - 1] - gs[:, g.topk_group]) < TIE
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter(-1, groups.topk(g.topk_group).indices, True)
        choice = choice.view(-1, g.num_group, E // g.num_group).masked_fill(~keep[..., None], -torch.inf)
        choice = choice.view(-1, E)
    cs = choice.sort(dim=-1, descending=True).values
    return tie | ((cs[:, K - 1] - cs[:, K]) < TIE)


@pytest.mark.parametrize("case", list(CASES))
def test_eager_face_matches_transformers(case):
    hidden, n_group, topk_group, norm, scale = CASES[case]
    moe = _hf_moe(hidden, n_group, topk_group, norm, scale)
    cfg = _cfg(hidden, n_group, topk_group, norm, scale)
    y = torch.randn(2, 96, hidden, generator=torch.Generator().manual_seed(1)).half().float()
    x2 = y.reshape(-1, hidden)
    with torch.no_grad():
        want = moe(y).reshape(-1, hidden)
        _, _, hf_idx = moe.gate(y)
        got = sigmoid_moe.eager(y, _tensors(moe), cfg, {}).reshape(-1, hidden)
        logits = sigmoid_moe.linear.eager(x2, _tensors(moe), "mlp.gate", {}).float()
        ours, _ = sigmoid_moe.route(logits, moe.gate.e_score_correction_bias, cfg.sigmoid_moe)
        unbiased, _ = sigmoid_moe.route(logits, torch.zeros(E), cfg.sigmoid_moe)
        tie = _hf_near_ties(moe, x2)

    same = lambda a, b: (a.sort(-1).values == b.sort(-1).values).all(-1)  # noqa: E731
    moved = int((~same(ours, unbiased)).sum())
    assert moved >= 0.1 * len(ours), f"the correction bias changed only {moved} of {len(ours)} selections"
    checked = ~tie
    assert int(checked.sum()) >= 0.8 * len(tie), f"{int(tie.sum())} of {len(tie)} tokens are near ties"
    bad = ~same(ours, hf_idx) & checked
    assert not bad.any(), f"{int(bad.sum())} non-tie tokens select other experts than HF, e.g. {bad.nonzero()[:4]}"
    cos = torch.nn.functional.cosine_similarity(got[checked], want[checked], dim=-1)
    assert float(cos.min()) >= 0.9999, f"min cosine {float(cos.min())}"
    assert float(want.abs().max()) > 0.5  # the comparison carries signal


# -- graph face vs eager face ------------------------------------------------------------------------------
LAYER = 3


def _checkpoint(tmp_path: Path, moe) -> Path:
    """A safetensors checkpoint under the canonical names the block reads (bf16 weights, fp32 bias)."""
    from safetensors.torch import save_file

    p = f"layers.{LAYER}.mlp."
    bf = lambda x: x.detach().to(torch.bfloat16).contiguous()  # noqa: E731
    tensors = {p + "gate.weight": bf(moe.gate.weight),
               p + "gate.e_score_correction_bias": moe.gate.e_score_correction_bias.detach().float().clone(),
               p + "shared_experts.up_proj.weight": bf(moe.shared_experts.up_proj.weight),
               p + "shared_experts.down_proj.weight": bf(moe.shared_experts.down_proj.weight)}
    for x in range(E):
        tensors[p + f"experts.{x}.up_proj.weight"] = bf(moe.experts.up_proj[x])
        tensors[p + f"experts.{x}.down_proj.weight"] = bf(moe.experts.down_proj[x])
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nemotron_h"}))
    return tmp_path


@pytest.mark.parametrize("case", ["g4 k1 norm x2.5", "g2 k2 (all kept) raw", "ungrouped norm"])
def test_graph_face_matches_eager_face(case, tmp_path):
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from edgellm_export.checkpoint.reader import Checkpoint
    from edgellm_export.contract import v0_7
    from edgellm_export.models.weights import WeightSource
    from edgellm_validate.cpu_precision import widen_fp16_arithmetic

    hidden, n_group, topk_group, norm, scale = CASES[case]
    cfg = _cfg(hidden, n_group, topk_group, norm, scale)
    g = GraphBuilder("sigmoid_moe")
    with Checkpoint(_checkpoint(tmp_path / "ckpt", _hf_moe(hidden, n_group, topk_group, norm, scale))) as ckpt:
        e = SimpleNamespace(g=g, w=WeightSource(ckpt, g), cfg=cfg, quant=QuantDecisions())
        x = g.input("x", FLOAT16, ["b", "s", hidden])
        out = sigmoid_moe.emit(e, LAYER, x)
        select = [nd for nd in g.nodes if nd.op_type == "TopK"][-1].output[1]
        g.output(out, "y", FLOAT16, ["b", "s", hidden])
        g.output(select, "top_i", 7, ["t", K])
        inits = {w.name: w.produce() for w in g.weights}
    p = f"layers.{LAYER}.mlp."
    assert set(inits) == {p + "gate.weight.T", p + "gate.e_score_correction_bias", p + "experts.up_proj.stacked",
                          p + "experts.down_proj.stacked", p + "shared_experts.up_proj.weight.T",
                          p + "shared_experts.down_proj.weight.T"}
    assert inits[p + "gate.e_score_correction_bias"].dtype == torch.float32  # selection needs the fp32 bias
    assert {nd.domain for nd in g.nodes} == {""}
    graph = helper.make_graph(g.nodes, g.name, g.inputs, g.outputs,
                              g.initializers + [numpy_helper.from_array(v.numpy(), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", v0_7.OPSETS[""])])
    model.ir_version = v0_7.IR_VERSION
    # As the CPU backend runs exports: onnxruntime's CPU fp16 arithmetic rounds some fp16 products off by an ulp
    # and computes chains of ops it has no fp16 kernel for in fp32 (no per-op rounding); widened, each op
    # rounds once, as TensorRT's. (Relu is widened too: onnxruntime has no fp16 Relu on x86, and its own fp32
    # Relu would swallow the rounding of the MatMul in front of it.)
    widen_fp16_arithmetic(model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    y = torch.randn(2, 40, hidden, generator=torch.Generator().manual_seed(2)).half()
    graph_out, graph_sel = sess.run(None, {"x": y.numpy()})
    t = {k[len(f"layers.{LAYER}."):]: v for k, v in inits.items()}
    with torch.no_grad():
        want = sigmoid_moe.eager(y.float(), t, cfg, {})
        logits = sigmoid_moe.linear.eager(y.float(), t, "mlp.gate", {}).reshape(-1, E)
        eager_sel, _ = sigmoid_moe.route(logits, t["mlp.gate.e_score_correction_bias"], cfg.sigmoid_moe)
    np.testing.assert_array_equal(np.sort(graph_sel, -1), eager_sel.sort(-1).values.numpy())
    scale_ = float(want.abs().max())
    ulp = 2.0 ** (np.floor(np.log2(scale_)) - 10)
    err = float(np.abs(graph_out.astype(np.float32) - want.numpy()).max())
    assert err <= ulp, f"max abs diff {err} > 1 fp16 ulp ({ulp}) at output scale {scale_}"


def test_quantized_experts_are_refused_by_name():
    cfg = _cfg(64, 2, 1, True, 1.0)
    g = GraphBuilder("t")
    quant = QuantDecisions()
    quant.linears = {"layers.0.mlp.experts.5.down_proj": SimpleNamespace(format="nvfp4")}
    e = SimpleNamespace(g=g, w=None, cfg=cfg, quant=quant)
    x = g.input("x", FLOAT16, ["b", "s", 64])
    with pytest.raises(UnsupportedError, match=r"layers\.0\.mlp\.experts\.5\.down_proj: quantized MoE experts"):
        sigmoid_moe.emit(e, 0, x)
    assert "layers.0.mlp.experts.5.down_proj" in sigmoid_moe.expert_linears(cfg, 0)
    assert sigmoid_moe.expert_linears(cfg, 0)[-2:] == ["layers.0.mlp.shared_experts.up_proj",
                                                       "layers.0.mlp.shared_experts.down_proj"]
