"""Quantized vision towers: a Qwen2.5-VL quantized by ModelOpt with its tower included (ModelOpt's stock configs
leave `*visual*` out; the recipe here keeps it in, as a user who wants a quantized tower does), exported and
validated. NVIDIA's 0.7.1 exporter does not take FP8 towers; NVFP4 and MXFP8 towers use the language model's
quantized linears.

References: ModelOpt's own fake-quantized model (the quantizers it calibrated, the scales it exported) on the
same patches, for the tower and for the golden image scenario's logits; transformers' unquantized model as a
looser bound.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
from fixtures.tower_checks import row_cosines
from safetensors.numpy import load_file

from edgellm_export.cli import main
from edgellm_validate.cpu_backend import CpuBackend
from edgellm_validate.validate import validate_export

# kind -> (stock config, mean row cosine vs ModelOpt's fake-quant tower, vs the tower on the checkpoint's
# dequantized weights (fixtures/dequant_reference; activations unquantized), vs the unquantized tower). ModelOpt
# 0.47 quantizes MXFP8 only with CUDA: that tower is written in its documented layout (fixtures/quant_layouts);
# its NVFP4 fake-quant forward needs CUDA too (calibration does not), so neither has the first comparison.
KINDS = {"fp8": ("FP8_DEFAULT_CFG", 0.999, 0.999, 0.999), "nvfp4": ("NVFP4_DEFAULT_CFG", None, 0.99, 0.98),
         "mxfp8": (None, None, 0.999, 0.999)}


def mxfp8_tower(root):
    """The bf16 Qwen2.5-VL with its tower's linears in ModelOpt's MXFP8 layout, the language model left fp16."""
    import torch
    from fixtures.quant_layouts import _mxfp8
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file
    from test_qwen2_5_vl_visual import make_qwen2_5_vl

    from edgellm_export.visual import qwen2_5_vl as qvl

    src, model = make_qwen2_5_vl(root / "bf16")
    cfg = json.loads((src / "config.json").read_text())
    spec = qvl.parse(cfg, cfg["text_config"]["hidden_size"], src / "config.json")
    linears = set(qvl.linear_names(spec))
    state = {}
    for key, t in load_torch(str(src / "model.safetensors")).items():
        canon = key.removeprefix("model.")
        if key.endswith(".weight") and canon[: -len(".weight")] in linears:
            for name, arr in _mxfp8(t.float().numpy()).items():
                state[key[: -len("weight")] + name] = arr if isinstance(arr, torch.Tensor) else torch.from_numpy(arr)
        else:
            state[key] = t.half() if t.is_floating_point() else t
    out = root / "mxfp8"
    out.mkdir()
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt", "version": "0.47.0"},
        "quantization": {"quant_algo": "MXFP8", "group_size": 32, "kv_cache_quant_algo": None,
                         "exclude_modules": ["lm_head", "model.embed_tokens", "model.language_model.layers*",
                                             "visual.patch_embed*"]}}))
    return out, None, model


def quantize_qwen2_5_vl(root, kind: str):
    """(ModelOpt checkpoint dir, the fake-quantized fp16 model, the unquantized fp32 model)."""
    import torch
    from test_qwen2_5_vl_visual import make_qwen2_5_vl

    if KINDS[kind][0] is None:
        return mxfp8_tower(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
    _, model = make_qwen2_5_vl(root / "bf16")
    reference = copy.deepcopy(model)
    cfg = copy.deepcopy(getattr(mtq, KINDS[kind][0]))
    # keep the tower in (the stock rule disables it); its Conv3d patch embedding stays unquantized
    cfg["quant_cfg"] = [r for r in cfg["quant_cfg"] if r.get("quantizer_name") != "*visual*"]
    # (an 8-bit format for its disabled quantizers: with NVFP4 ones ModelOpt 0.47 routes the Conv3d to a CUDA kernel)
    cfg["quant_cfg"].append({"quantizer_name": "*patch_embed*", "cfg": {"num_bits": 8, "axis": None},
                             "enable": False})
    g = torch.Generator().manual_seed(1)

    def calibrate(m):
        with torch.no_grad():
            for _ in range(2):
                ids = torch.randint(0, 400, (1, 24), generator=g)
                ids[0, 3:19] = 500
                m(input_ids=ids, pixel_values=torch.randn(64, 3 * 2 * 14 * 14, generator=g).half(),
                  image_grid_thw=torch.tensor([[1, 8, 8]]))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = mtq.quantize(model.half(), cfg, calibrate)
        fake_quant = copy.deepcopy(model)  # the export replaces the model's weights by their quantized bytes
        export_hf_checkpoint(model, export_dir=root / kind, dtype=torch.float16)
    finally:
        torch.set_num_threads(threads)
    return root / kind, fake_quant, reference


@pytest.fixture(scope="module", params=sorted(KINDS))
def exported(request, tmp_path_factory):
    pytest.importorskip("modelopt.torch.quantization")
    root = tmp_path_factory.mktemp(f"tower_{request.param}")
    ckpt, quantized, reference = quantize_qwen2_5_vl(root, request.param)
    assert main(["-q", "export", str(ckpt), str(root / "out")]) == 0
    return request.param, ckpt, quantized, reference, root / "out"


def dequantized(reference, ckpt):
    """The unquantized model with the tower's linears replaced by the checkpoint's dequantized weights."""
    import torch
    from fixtures.dequant_reference import _load, dequantize_linear

    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update(_load(f))
    model = copy.deepcopy(reference)
    params = dict(model.named_parameters())
    linears = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale") and "visual." in k})
    assert linears
    for p in linears:
        t = {k[len(p) + 1:]: v for k, v in tensors.items() if k.startswith(p + ".") and "." not in k[len(p) + 1:]}
        name = p + ".weight" if p + ".weight" in params else "model." + p + ".weight"
        params[name].data = torch.from_numpy(dequantize_linear(t, {}).astype(np.float32))
    return model


def tower(model, patches, grids):
    import torch

    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        out = model.model.visual(torch.from_numpy(patches).to(dtype), grid_thw=torch.tensor(grids)).pooler_output
    return out.float().numpy()


def test_tower_matches_modelopt(exported, record_property):
    from edgellm_export.visual import qwen2_5_vl as qvl

    kind, ckpt, quantized, reference, out = exported
    algo = json.loads((ckpt / "hf_quant_config.json").read_text())["quantization"]
    assert "visual*" not in algo.get("exclude_modules", [])  # the tower really is quantized
    assert json.loads((out / "manifest.json").read_text())["files"]  # (one manifest for the whole OUT)
    golden = load_file(str(out / "visual" / "golden" / "tensors.safetensors"))
    t = sum(a * b * c for a, b, c in qvl.GOLDEN_GRIDS)
    be = CpuBackend(out / "visual")
    try:
        got = be.run({k: golden[k] for k in qvl.INPUTS})["output"].astype(np.float32)
    finally:
        be.close()
    grids = [list(x) for x in qvl.GOLDEN_GRIDS]
    references = {"modelopt": quantized if KINDS[kind][1] is not None else None,
                  "dequantized": dequantized(reference, ckpt), "unquantized": reference}
    for (what, model), bound in zip(references.items(), KINDS[kind][1:]):
        if model is None:
            continue
        cos = float(row_cosines(got, tower(model, golden["input"][:t], grids)).mean())
        record_property(f"{kind}_tower_cosine_vs_{what}", cos)
        assert cos >= bound, (what, cos)
    graph = __import__("onnx").load(str(out / "visual" / "model.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert {"fp8": "QuantizeLinear", "nvfp4": "TRT_FP4DynamicQuantize",
            "mxfp8": "TRT_MXFP8DynamicQuantize"}[kind] in ops


def test_export_validates(exported):
    kind, _, _, _, out = exported
    res = validate_export(out, result_path=out.parent / "v.json")
    assert res["passed"], res["failures"]
    assert res["components"]["visual"]["outputs"]["output"]["worst_cosine"] >= 0.999


def test_int4_tower_is_refused(tmp_path, capsys):
    """A tower whose metadata says INT4 AWQ (the runtime's visual builder has no INT4 path): exit 2."""
    pytest.importorskip("modelopt.torch.quantization")
    import shutil

    ckpt, _, _ = quantize_qwen2_5_vl(tmp_path, "fp8")
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    meta = json.loads((bad / "hf_quant_config.json").read_text())
    meta["quantization"].update(quant_algo="MIXED_PRECISION", quantized_layers={
        "visual.blocks.0.attn.qkv": {"quant_algo": "W4A16_AWQ", "group_size": 128}})
    (bad / "hf_quant_config.json").write_text(json.dumps(meta))
    cfg = json.loads((bad / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["-q", "export", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "hf_quant_config.json" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
