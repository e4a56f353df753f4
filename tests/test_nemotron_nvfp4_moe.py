"""Nemotron-H's routed experts in NVFP4 on trt_edgellm::Nvfp4MoePlugin (families.md §2.4, quant.md §3.12).

Checkpoint tensors are made with ModelOpt's NVFP4 formulas by tests/test_nvfp4_moe.py's independent helpers
(ml_dtypes rounding). Layouts are checked against index arithmetic written here (nibble positions, the CuTe
atom offset, the fp16 bit projection), not the module's reshapes.

References, fp64: routing as HF's NemotronHTopkRouter (sigmoid, bias for selection only, group top-2,
renormalised, scaled), dequantized weights; activations unquantized (the decode path, W4A16) or
fake-quantized with the two activation global scales (the prefill path).
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from fixtures.moe_reference import check_twin_against_hf, hf_logits_with_router_margins, sigmoid_margin
from test_nvfp4_moe import dequantize_weight, fake_quant, quantize_weight

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, GraphBuilder
from edgellm_core.ops import nvfp4_moe_nemotron as op_mod
from edgellm_validate.compare import cosine_rows
from edgellm_validate.lowering import lower_custom_ops

F8 = ml_dtypes.float8_e4m3fn


# --------------------------------------------------------------------------- layouts

def test_n_major_codes_move_every_nibble():
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, (64, 48)).astype(np.uint8)  # [N, K/2]
    kn = op_mod.n_major_codes(packed)
    assert kn.dtype == np.int8 and kn.shape == (96, 32)
    u = kn.view(np.uint8)
    for n, k in ((0, 0), (1, 0), (0, 1), (63, 95), (17, 42), (40, 7)):
        want = (packed[n, k // 2] >> (4 * (k % 2))) & 15
        assert (u[k, n // 2] >> (4 * (n % 2))) & 15 == want, (n, k)
    assert np.array_equal(op_mod.codes_from_n_major(kn), packed)


def test_scale_layouts():
    """Prefill: scale [n, j] at byte n//128 * kt*512 + j//4 * 512 + n%32 * 16 + (n%128)//32 * 4 + j%4 of the
    `[pad128(N), pad4(K/16)]` tensor. Decode: `[K/16, N]`, the fp16 with bits byte << 7 equals the scale."""
    rng = np.random.default_rng(1)
    for n, ks in ((128, 8), (200, 6), (64, 4)):
        sf = rng.integers(0, 127, (n, ks)).astype(np.uint8)
        s2 = op_mod.prefill_scales(sf)
        kt = -(-ks // 4)
        assert s2.shape == (-(-n // 128) * 128, kt * 4)
        nn, jj = np.meshgrid(np.arange(n), np.arange(ks), indexing="ij")
        off = nn // 128 * kt * 512 + jj // 4 * 512 + nn % 32 * 16 + (nn % 128) // 32 * 4 + jj % 4
        assert np.array_equal(s2.view(np.uint8).reshape(-1)[off], sf)
        assert np.array_equal(op_mod.scales_from_prefill(s2, n, ks), sf)
        dec = op_mod.decode_scales(sf)
        assert dec.shape == (ks, n)
        h16 = (dec.view(np.uint8).astype(np.uint16) << 7).view(np.float16).astype(np.float32)
        assert np.array_equal(h16, sf.view(F8).astype(np.float32).T)
    everything = np.arange(127, dtype=np.uint8)  # every non-negative finite e4m3 byte, subnormals included
    assert np.array_equal(op_mod.DECODE_VALUES[op_mod.DECODE_BYTE[everything]], everything.view(F8).astype(np.float32))


# --------------------------------------------------------------------------- the op against references

def _experts(rng, e, h, inter):
    out = []
    for _ in range(e):
        up = (rng.standard_normal((inter, h)) * 0.05 * rng.uniform(0.5, 2)).astype(np.float32)
        down = (rng.standard_normal((h, inter)) * 0.05 * rng.uniform(0.5, 2)).astype(np.float32)
        up[:, :16] *= 1e-3  # tiny blocks
        q = {}
        for p, w in (("up", up), ("down", down)):
            ws2 = np.float32(np.abs(w).max() / (6 * 448))
            q[p] = (*quantize_weight(w, ws2), ws2)
        out.append(q)
    return out


def pack(experts, hgs, bias):
    """The plugin's twelve inputs after the logits and hidden states, from checkpoint-layout experts."""
    st = lambda f: np.stack([f(x) for x in experts])  # noqa: E731
    return (np.asarray(hgs, np.float32),
            st(lambda x: op_mod.n_major_codes(x["up"][0])),
            st(lambda x: op_mod.prefill_scales(x["up"][1].view(np.uint8))),
            np.array([x["up"][2] for x in experts], np.float32),
            st(lambda x: op_mod.n_major_codes(x["down"][0])),
            st(lambda x: op_mod.prefill_scales(x["down"][1].view(np.uint8))),
            np.array([x["down"][2] for x in experts], np.float32),
            st(lambda x: op_mod.decode_scales(x["up"][1].view(np.uint8))),
            st(lambda x: op_mod.decode_scales(x["down"][1].view(np.uint8))),
            np.asarray(bias, np.float32))


def hf_route(logits, bias, k, n_group, topk_group, norm, scale):
    """NemotronHTopkRouter's selection, fp64: (indices [T, k], weights [T, k])."""
    s = torch.sigmoid(torch.from_numpy(logits).double())
    c = (s + torch.from_numpy(bias).double()).view(s.shape[0], n_group, -1)
    gs = c.topk(2, -1).values.sum(-1)
    keep = torch.zeros_like(gs, dtype=torch.bool).scatter(-1, gs.topk(topk_group, -1).indices, True)
    c = c.masked_fill(~keep[..., None], float("-inf")).view(s.shape)
    idx = c.topk(k, -1).indices
    w = s.gather(-1, idx)
    if norm:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx.numpy(), (w * scale).numpy()


def reference(logits, x, experts, hgs, route, quantized):
    idx, w = route
    xs = x.reshape(-1, x.shape[-1]).astype(np.float64)
    deq = [{p: dequantize_weight(*t) for p, t in ex.items()} for ex in experts]
    fq = (lambda a, gs: fake_quant(a, gs)) if quantized else (lambda a, gs: a)
    out = np.zeros_like(xs)
    for t in range(xs.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            act = np.maximum(fq(xs[t : t + 1], hgs[0]) @ deq[e]["up"].T, 0) ** 2
            out[t] += w[t, j] * (fq(act, hgs[1]) @ deq[e]["down"].T)[0]
    return out


E, TOPK, NG, KG, HID, INT = 8, 2, 4, 2, 128, 64
ATTRS = dict(num_experts=E, top_k=TOPK, hidden_size=HID, moe_inter_size=INT, n_group=NG, topk_group=KG)


def _case(seed, tokens):
    rng = np.random.default_rng(seed)
    experts = _experts(rng, E, HID, INT)
    x = (rng.standard_normal((1, tokens, HID)) * rng.uniform(0.2, 3, (1, 1, HID))).astype(np.float16)
    logits = (rng.standard_normal((tokens, E)) * 2).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, E).astype(np.float32)
    amax = float(np.abs(x).max())
    hgs = [amax / (6 * 448), 0.5 / (6 * 448)]  # below the ReLU^2 amax: saturated FC2 blocks exercised
    return experts, x, logits, bias, hgs


def run_eager(logits, x, packed, norm=True, scale=2.5):
    op = op_mod.register_torch_op()
    return op(torch.from_numpy(logits), torch.from_numpy(x), *map(torch.from_numpy, packed), E, TOPK, HID, INT, 0,
              NG, KG, int(norm), scale, 1).numpy()


def run_lowered(logits, x, packed, norm=True, scale=2.5):
    op_mod.register_schema()
    g = GraphBuilder("moe")
    lg, hs = g.input("logits", FLOAT, ["t", E]), g.input("x", FLOAT16, ["b", "s", HID])
    names = []
    for name, arr in zip(op_mod.INPUTS[2:], packed):
        g.initializers.append(onnx.numpy_helper.from_array(arr, name))
        names.append(name)
    out = op_mod.emit(g, lg, hs, *names, **ATTRS, norm_topk_prob=norm, routed_scaling_factor=scale)
    g.output(out, "y", FLOAT16, ["b", "s", HID])
    model = g.to_model("unused", {"": 24, "trt_edgellm": 1}, 10)
    onnx.checker.check_model(model, full_check=True)
    (node,) = [nd for nd in model.graph.node if nd.domain == "trt_edgellm"]
    assert node.op_type == "Nvfp4MoePlugin" and list(node.input) == ["logits", "x", *names]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {**ATTRS, "activation_type": 0, "norm_topk_prob": int(norm), "routing_mode": 1,
                     "routed_scaling_factor": pytest.approx(scale)}
    lower_custom_ops(model)
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"logits": logits, "x": x})[0]


@pytest.mark.parametrize("tokens", [5, 40])
def test_eager_and_lowering_against_references(tokens):
    """Decode (T = 5 <= 16, W4A16: tokens not quantized) and prefill (T = 40: both activations NVFP4 with the
    two global scales) against fp64 references with HF's routing: cosine >= 0.9999 on every row (measured in
    the printout). The other path's reference must be visibly worse (the paths really differ). Decode scales
    fed as the raw fp8 bytes (value / 256 after the fp16 bit trick) must fail
    (checked on magnitude: the factor is uniform). Lowering (onnxruntime) vs eager:
    within one fp16 step of the largest output on <= 1% of the elements."""
    experts, x, logits, bias, hgs = _case(3, tokens)
    packed = pack(experts, hgs, bias)
    y = run_eager(logits, x, packed)
    assert y.dtype == np.float16 and y.shape == x.shape
    route = hf_route(logits, bias, TOPK, NG, KG, True, 2.5)
    prefill = tokens > 16
    ref = reference(logits, x, experts, hgs, route, quantized=prefill)
    other = reference(logits, x, experts, hgs, route, quantized=not prefill)
    got = y.reshape(-1, HID).astype(np.float64)
    cos, cos_other = float(cosine_rows(got, ref).min()), float(cosine_rows(got, other).min())
    err = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"\nT={tokens}: eager vs reference cos {cos:.7f} (max rel err {err:.2e}); other path's {cos_other:.5f}")
    assert cos >= 0.9999 and cos_other < cos, (cos, cos_other)
    if not prefill:
        bad = list(packed)
        bad[7] = np.stack([x["up"][1].view(np.int8).T for x in experts])  # raw fp8 bytes, not projected
        wrong = run_eager(logits, x, bad).reshape(-1, HID).astype(np.float64)
        assert np.abs(wrong - ref).max() > 0.5 * np.abs(ref).max()  # a uniform 1/256: cosine alone misses it
    low = run_lowered(logits, x, packed)
    diff = np.abs(low.astype(np.float32) - y.astype(np.float32))
    print(f"lowering vs eager: max {diff.max():.3g} of {np.abs(y).max():.3g}, {(diff > 0).mean():.2%} differ")
    assert diff.max() <= 2**-10 * np.abs(y).max() and (diff > 0).mean() <= 0.01


def test_routing_is_the_kernels():
    """Sigmoid, bias for selection only, group top-2 sums, renormalised without epsilon, scaled; and with
    norm_topk_prob false the weights are the raw sigmoids times the factor."""
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((50, E)) * 3).astype(np.float32)
    bias = rng.uniform(-1, 1, E).astype(np.float32)
    for norm in (True, False):
        dense = op_mod.route_torch(torch.from_numpy(logits), torch.from_numpy(bias), TOPK, NG, KG, norm, 2.5).numpy()
        idx, w = hf_route(logits, bias, TOPK, NG, KG, norm, 2.5)
        assert np.array_equal(np.sort(np.nonzero(dense)[1].reshape(-1, TOPK), 1), np.sort(idx, 1))
        assert np.allclose(np.take_along_axis(dense, idx, 1), w, rtol=1e-6, atol=0)


def test_shape_checks():
    assert op_mod.check_shape(2688, 1856, 128, 6, 1, 1) is None  # Nemotron-3-Nano-30B-A3B's MoE sizes
    assert "multiple of 64" in op_mod.check_shape(2688, 1000, 128, 6, 1, 1)
    assert "hidden_size 100" in op_mod.check_shape(100, 128, 8, 2, 1, 1)
    assert "1..n_routed_experts" in op_mod.check_shape(128, 64, 4, 5, 1, 1)
    assert "n_group 3" in op_mod.check_shape(128, 64, 8, 2, 3, 1)
    assert op_mod.stack_shapes(8, 2688, 1856)["up_block_scale"] == (8, 1920, 168)


# --------------------------------------------------------------------------- a tiny Nemotron-H, exported

MOE_LAYER = 1  # PATTERN "ME*-M": layer 1 is the MoE
EXCLUDE = ["lm_head", "*mixer*", "*self_attn*", "*.mlp.gate", "*shared_experts*", "*.mlp.up_proj", "*.mlp.down_proj"]


def make_nvfp4_checkpoint(root, seed=None, **overrides):
    """test_nemotron_h's tiny model (hidden 256, 8 experts of 128, top-2) saved in bf16, its routed experts
    then NVFP4 (ModelOpt formulas; input scales calibrated on the golden sequences: amax / (6 * 448));
    the fp32 HF model's experts are set to the dequantized weights (the reference)."""
    from conftest import save_checkpoint
    from safetensors.torch import load_file, save_file
    from test_nemotron_h import NEAR_TIE, _golden_sequences, _model, _routing_margin

    seqs = _golden_sequences(512)
    if seed is None:
        model = next(m for m in map(_model, range(7, 40)) if _routing_margin(m, seqs) > NEAR_TIE)
    else:
        model = _model(seed, **overrides)
    ckpt = save_checkpoint(model, root / "ckpt")
    state = load_file(str(ckpt / "model.safetensors"))
    ex = model.model.layers[MOE_LAYER].mixer.experts
    amax = {"up_proj": 0.0, "down_proj": 0.0}
    orig = ex.forward

    def record(hidden, idx, w):
        amax["up_proj"] = max(amax["up_proj"], float(hidden.abs().max()))
        act = torch.relu(hidden @ ex.up_proj.transpose(1, 2)) ** 2  # [E, T, I], every expert: an upper bound
        amax["down_proj"] = max(amax["down_proj"], float(act.abs().max()))
        return orig(hidden, idx, w)

    with torch.no_grad():
        for x in range(ex.num_experts):
            for p in ("up_proj", "down_proj"):
                w = getattr(ex, p)[x].numpy()
                ws2 = np.float32(np.abs(w).max() / (6 * 448))
                packed, bs = quantize_weight(w, ws2)
                key = f"backbone.layers.{MOE_LAYER}.mixer.experts.{x}.{p}"
                state[f"{key}.weight"] = torch.from_numpy(packed)
                state[f"{key}.weight_scale"] = torch.from_numpy(bs.view(np.uint8)).view(torch.float8_e4m3fn)
                state[f"{key}.weight_scale_2"] = torch.tensor(float(ws2), dtype=torch.float32)
                getattr(ex, p)[x] = torch.from_numpy(dequantize_weight(packed, bs, ws2).astype(np.float32))
        ex.forward = record
        for seq in seqs:
            model(torch.tensor([seq]))
        ex.forward = orig
    for x in range(ex.num_experts):
        for p in ("up_proj", "down_proj"):
            scale = np.float32(amax[p] / (6 * 448))
            state[f"backbone.layers.{MOE_LAYER}.mixer.experts.{x}.{p}.input_scale"] = torch.tensor(float(scale))
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "hf_quant_config.json").write_text(json.dumps({"quantization": {
        "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": EXCLUDE}}))
    return ckpt, model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from edgellm_export.cli import main

    root = tmp_path_factory.mktemp("nemotron-nvfp4")
    ckpt, model = make_nvfp4_checkpoint(root)
    assert main(["-q", "export", str(ckpt), str(root / "out")]) == 0
    return ckpt, model, root / "out"


def test_exported_stacks_hold_the_checkpoints_bits(exported):
    """Per expert, unpacked: FP4 codes and both block-scale copies equal the checkpoint's; the global scales
    are weight_scale_2; hidden_global_scale is the max input_scale of up and of down."""
    from safetensors import safe_open
    from test_nvfp4_moe import _inits

    ckpt, _, out = exported
    arrays = _inits(out / "llm")
    f = safe_open(str(ckpt / "model.safetensors"), "pt")
    st = {w: arrays[f"layers.{MOE_LAYER}.mlp.experts.{w}.stacked"] for w in op_mod.INPUTS[2:11]}
    h, inter, e = 256, 128, 8
    assert {w: a.shape for w, a in st.items()} == op_mod.stack_shapes(e, h, inter)
    nib = lambda b: np.stack([b & 15, b >> 4], -1).reshape(b.shape[0], -1)  # noqa: E731
    scalar = lambda key: np.float32(f.get_tensor(key).item())  # noqa: E731
    for x in range(e):
        for short, k, n in (("up", h, inter), ("down", inter, h)):
            key = f"backbone.layers.{MOE_LAYER}.mixer.experts.{x}.{short}_proj"
            codes, sf = f.get_tensor(f"{key}.weight").numpy(), f.get_tensor(f"{key}.weight_scale").view(
                torch.uint8).numpy()
            assert np.array_equal(nib(st[f"{short}_qweights"][x].view(np.uint8)), nib(codes).T)  # [K, N]
            s2 = st[f"{short}_block_scale"][x].view(np.uint8).reshape(-1)
            nn, jj = np.meshgrid(np.arange(n), np.arange(k // 16), indexing="ij")
            kt = -(-(k // 16) // 4)
            assert np.array_equal(s2[nn // 128 * kt * 512 + jj // 4 * 512 + nn % 32 * 16 + (nn % 128) // 32 * 4
                                     + jj % 4], sf)
            dec = (st[f"{short}_block_scale_decode"][x].view(np.uint8).astype(np.uint16) << 7).view(np.float16)
            assert np.array_equal(dec.astype(np.float32), sf.view(F8).astype(np.float32).T)
            assert st[f"{short}_global_scale"][x] == scalar(f"{key}.weight_scale_2")
    for i, short in enumerate(("up", "down")):
        assert st["hidden_global_scale"][i] == max(
            scalar(f"backbone.layers.{MOE_LAYER}.mixer.experts.{x}.{short}_proj.input_scale") for x in range(e))


def hf_per_sequence(model, llm, hgs):
    """HF logits per golden step (full sequences, the MoE's experts dequantized, fp64), the expert
    activations fake-quantized with hidden_global_scale exactly at the positions the runtime's call runs the
    plugin's prefill path (B*S > 16), unquantized where it runs the decode GEMVs; and per (scenario, row) the
    smallest gap between the k-th and (k+1)-th biased router score."""
    ex, gate = model.model.layers[MOE_LAYER].mixer.experts, model.model.layers[MOE_LAYER].mixer.gate
    k, state = 2, {}

    def experts(hidden, idx, w):
        out = torch.zeros_like(hidden, dtype=torch.float64)
        quant = state["quant"][: hidden.shape[0]]
        for t in range(hidden.shape[0]):
            a = hidden[t : t + 1].double().numpy()
            for j in range(idx.shape[1]):
                e = int(idx[t, j])
                xq = fake_quant(a, hgs[0]) if quant[t] else a
                act = np.maximum(xq @ ex.up_proj[e].double().numpy().T, 0) ** 2
                act = fake_quant(act, hgs[1]) if quant[t] else act
                out[t] += float(w[t, j]) * torch.from_numpy((act @ ex.down_proj[e].double().numpy().T)[0])
        return out.to(hidden.dtype)

    def before(sc, b):  # which of this sequence's tokens the runtime sends down the prefill path
        quant = []
        for st in sc["steps"]:
            n = st["context_lengths"][b] if st["phase"] != "decode" else 1
            calls_tokens = len(st["token_ids"]) * len(st["token_ids"][0])  # B * S of the call
            quant.extend([calls_tokens > op_mod.DECODE_MAX_TOKENS] * n)
        state["quant"] = quant

    orig = ex.forward
    ex.forward = experts
    try:
        return hf_logits_with_router_margins(model, llm, [gate], sigmoid_margin(k), before)
    finally:
        ex.forward = orig


def test_end_to_end_against_hf_with_dequantized_experts(exported):
    """validate_export passes (twin vs golden, both on the plugin's numerics); the twin vs HF with the
    dequantized experts (fp64) on every sequence without a routing near tie:
    cosine >= 0.999 and the same top-1 where HF's top two are > 0.1 apart. The reference fake-quantizes the
    expert activations exactly where the runtime's call takes the plugin's prefill path (measured worst
    cosine in the printout)."""
    from test_nemotron_h import NEAR_TIE

    from edgellm_validate.validate import validate_export

    _, model, out = exported
    llm = out / "llm"
    res = validate_export(out)
    assert res["passed"], res["failures"]
    graph = onnx.load(str(llm / "model.onnx"), load_external_data=False).graph
    ops = [nd.op_type for nd in graph.node if nd.domain == "trt_edgellm"]
    assert ops.count("Nvfp4MoePlugin") == 1
    from test_nvfp4_moe import _inits

    hgs = _inits(llm)[f"layers.{MOE_LAYER}.mlp.experts.hidden_global_scale.stacked"].astype(np.float64)
    ref, margins = hf_per_sequence(model, llm, hgs)
    # top-1 only where HF's own top two are > 0.1 apart: NVFP4 noise may swap a closer pair
    stats = check_twin_against_hf(llm, ref, margins, near_tie=NEAR_TIE, min_cosine=0.999, top1_margin=0.1)
    print(f"\ntwin vs HF (dequantized experts): worst cosine {stats['worst']:.6f} over {stats['rows']} rows")
    assert stats["rows"] >= 15 and stats["phases"] == {"prefill", "chunked_prefill", "decode"}


def _copy(ckpt, dst):
    import shutil

    shutil.copytree(ckpt, dst)
    return dst


def _refused(ckpt, tmp_path, capsys, *words):
    from edgellm_export.cli import main

    capsys.readouterr()  # the checkpoint writer's progress bars
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and "Traceback" not in err, err
    assert len([ln for ln in err.strip().splitlines() if ln.strip()]) == 1, err  # one paragraph
    assert not (tmp_path / "out").exists()
    return err


def test_quantized_projection_outside_the_experts_is_refused(exported, tmp_path, capsys):
    """A Mamba2 in_proj with NVFP4 scales: refused up front (nemotron_h.prepare), naming config.json."""
    from safetensors.torch import load_file, save_file

    ckpt = _copy(exported[0], tmp_path / "ckpt")
    state = load_file(str(ckpt / "model.safetensors"))
    state["backbone.layers.0.mixer.in_proj.weight_scale_2"] = torch.tensor(1.0)
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    _refused(ckpt, tmp_path, capsys, "config.json", "layers.0.mixer.in_proj.weight_scale_2",
             "only NVFP4 routed experts")


def test_mixed_expert_formats_are_refused(exported, tmp_path, capsys):
    """Expert 3's up_proj left in bf16 (excluded in the metadata, tensors agreeing): one packed stack per
    layer cannot hold it; the refusal names the linear and the checkpoint."""
    from safetensors.torch import load_file, save_file

    ckpt = _copy(exported[0], tmp_path / "ckpt")
    state = load_file(str(ckpt / "model.safetensors"))
    key = f"backbone.layers.{MOE_LAYER}.mixer.experts.3.up_proj"
    deq = dequantize_weight(state[f"{key}.weight"].numpy(), state[f"{key}.weight_scale"].view(torch.uint8).numpy()
                            .view(F8), float(state[f"{key}.weight_scale_2"]))
    for suffix in ("weight_scale", "weight_scale_2", "input_scale"):
        del state[f"{key}.{suffix}"]
    state[f"{key}.weight"] = torch.from_numpy(deq.astype(np.float32)).to(torch.bfloat16)
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    (ckpt / "hf_quant_config.json").write_text(json.dumps({"quantization": {
        "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": [*EXCLUDE, "*experts.3.up_proj"]}}))
    _refused(ckpt, tmp_path, capsys, "experts.3.up_proj", "one format", "ckpt")


def test_sizes_outside_the_kernels_are_refused(tmp_path, capsys):
    """moe_intermediate_size 96 (not a multiple of 64: configurePlugin refuses it)."""
    ckpt, _ = make_nvfp4_checkpoint(tmp_path / "c", seed=1, moe_intermediate_size=96)
    _refused(ckpt, tmp_path, capsys, "moe_intermediate_size 96", "multiple of 64", "Nvfp4MoePlugin", "ckpt")
