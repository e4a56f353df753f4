"""visual_build's profile for the exported vision encoders, against the contract's numbers (families.md §5.2,
§5.4: visualBuilder.cpp setupQwenViTProfile / setupInternPhi4ViTProfile), on real exports' graphs and configs."""

from __future__ import annotations

import json

import onnx
import pytest

from edgellm_core.errors import UnsupportedError
from edgellm_validate.trt.profiles import ProfileError, ShapeRange
from edgellm_validate.trt.visual_profiles import VisualLimits, visual_profile


def graph_dims(visual_dir):
    model = onnx.load(str(visual_dir / "model.onnx"), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def exported(tmp_path, maker):
    from edgellm_export.cli import main

    ckpt, _ = maker(tmp_path / "ckpt")
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out"), "--no-golden"]) == 0
    return tmp_path / "out" / "visual"


def test_qwen2_5_vl_profile_covers_every_input(tmp_path):
    from test_qwen2_5_vl_visual import make_qwen2_5_vl

    vdir = exported(tmp_path, make_qwen2_5_vl)
    dims = graph_dims(vdir)
    prof = visual_profile(json.loads((vdir / "config.json").read_text()), dims)  # defaults 4 / 1024 / 512
    assert set(prof) == set(dims)  # every graph input, nothing else
    assert prof["input"] == ShapeRange((16, 1176), (2056, 1176), (4096, 1176))  # 3*2*14*14 = 1176
    assert prof["rotary_pos_emb"] == ShapeRange((16, 16), (2056, 16), (4096, 16))  # head_dim 32 / 2
    assert prof["cu_seqlens"] == ShapeRange((2,), (257,), (257,))  # 1024 / 4 images
    assert prof["max_seqlen_carrier"] == ShapeRange((1,), (1024,), (2048,))
    assert prof["cu_window_seqlens"] == ShapeRange((2,), (1024,), (1024,))
    assert prof["window_index"] == prof["reverse_window_index"] == ShapeRange((4,), (514,), (1024,))


def test_qwen3_vl_profile_has_the_position_table_inputs(tmp_path):
    from test_qwen3_vl_visual import make_qwen3_vl

    vdir = exported(tmp_path, make_qwen3_vl)
    dims = graph_dims(vdir)
    prof = visual_profile(json.loads((vdir / "config.json").read_text()), dims, VisualLimits(64, 512, 256))
    assert set(prof) == set(dims)
    assert prof["fast_pos_embed_idx"] == prof["fast_pos_embed_weight"] == ShapeRange((4, 256), (4, 1152), (4, 2048))
    assert prof["cu_seqlens"] == ShapeRange((2,), (9,), (9,))


def test_internvl_profile_counts_tiles(tmp_path):
    from test_internvl_visual import VARIANTS, make_internvl

    vdir = exported(tmp_path, lambda p: make_internvl(p, VARIANTS["layer_norm"]))
    dims = graph_dims(vdir)
    cfg = json.loads((vdir / "config.json").read_text())
    prof = visual_profile(cfg, dims, VisualLimits(256, 3072, 1024))
    assert set(prof) == set(dims)
    assert prof["input"] == ShapeRange((1, 3, 128, 128), (6, 3, 128, 128), (12, 3, 128, 128))
    with pytest.raises(ProfileError, match="multiples of 256"):
        visual_profile(cfg, dims, VisualLimits())  # visual_build's own defaults (4 / 1024), which it refuses here
    # so a tiled tower's default is one to four tiles
    assert visual_profile(cfg, dims)["input"] == ShapeRange((1, 3, 128, 128), (2, 3, 128, 128), (4, 3, 128, 128))
    with pytest.raises(UnsupportedError, match="'siglip'"):
        visual_profile({"model_type": "siglip"}, dims)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl"])
def test_trt_backend_builds_and_runs_the_visual_engine(family, tmp_path, monkeypatch):
    """`validate --backend trt` on a VLM export: the LLM engine as before, then the visual engine visual_build
    would make (one profile; the plugin library asked for ViTAttentionPlugin only where the graph has it),
    run once on the golden inputs and judged like the CPU twin. TensorRT here is the stand-in
    (tests/fake_tensorrt.py: it runs the graph with onnxruntime and enforces the profile)."""
    import _ctypes
    from pathlib import Path

    import fake_tensorrt as fake_trt

    from edgellm_export.cli import main
    from edgellm_validate.trt import plugin as plugin_mod
    from edgellm_validate.validate import validate_export

    if family == "qwen2_5_vl":
        from test_qwen2_5_vl_visual import make_qwen2_5_vl as maker
    else:
        from test_internvl_visual import VARIANTS, make_internvl

        def maker(p):
            return make_internvl(p, VARIANTS["layer_norm"])
    ckpt, _ = maker(tmp_path / "ckpt")
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 0
    monkeypatch.setattr(plugin_mod, "_loaded", {})
    device = fake_trt.FakeDevice(sm=110, name="Fake Thor")
    fake_trt.reset(device)
    fake_trt.REGISTRY.creators.update(plugin_mod.exported_plugins())
    try:
        opts = {"trt": fake_trt, "device": device, "engine_dir": tmp_path / "engine",
                "plugin_path": str(Path(_ctypes.__file__).resolve())}
        res = validate_export(tmp_path / "out", backend="trt", result_path=tmp_path / "v.json", backend_options=opts)
        assert res["passed"], res["failures"]
        visual = res["components"]["visual"]
        assert visual["outputs"]["output"]["worst_cosine"] >= 0.999
        assert len([c for c in fake_trt.CALLS if c[0] == "build"]) == 2  # the LLM's and the visual engine
        assert (visual["engine"]["plugin"] is None) == (family == "internvl")  # no plugin node in InternVL
        cfg = json.loads((tmp_path / "engine" / "visual" / "config.json").read_text())
        # visual_build's defaults, but one tile at least for the tiled InternVL tower
        assert cfg["builder_config"]["min_image_tokens"] == (4 if family == "qwen2_5_vl" else 256)
        assert (tmp_path / "engine" / "visual" / "visual.engine").is_file()
    finally:
        fake_trt.reset()


@pytest.mark.parametrize("family", ["phi4mm", "qwen3_asr"])
def test_trt_backend_builds_every_encoder(family, tmp_path, monkeypatch):
    """The same for Phi-4-MM's tower (its separators copied next to the engine, as visual_build does) and
    Qwen3-ASR's audio encoder (audio_build's profile and engine name), on the stand-in."""
    import _ctypes
    from pathlib import Path

    import fake_tensorrt as fake_trt

    from edgellm_export.cli import main
    from edgellm_validate.trt import plugin as plugin_mod
    from edgellm_validate.validate import validate_export

    if family == "phi4mm":
        from test_phi4mm_visual import make_phi4mm

        ckpt, _ = make_phi4mm(tmp_path / "ckpt")
        args, component, output, engine = ["--components", "llm,visual"], "visual", "output", "visual.engine"
    else:
        from test_qwen3_asr_export import make_asr

        ckpt, _ = make_asr(tmp_path / "ckpt")
        args, component, output, engine = [], "audio", "last_hidden_state", "audio_encoder.engine"
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out"), *args]) == 0
    monkeypatch.setattr(plugin_mod, "_loaded", {})
    device = fake_trt.FakeDevice(sm=110, name="Fake Thor")
    fake_trt.reset(device)
    fake_trt.REGISTRY.creators.update(plugin_mod.exported_plugins())
    try:
        opts = {"trt": fake_trt, "device": device, "engine_dir": tmp_path / "engine",
                "plugin_path": str(Path(_ctypes.__file__).resolve())}  # the LLM engine's (the encoders need none)
        res = validate_export(tmp_path / "out", backend="trt", result_path=tmp_path / "v.json", backend_options=opts)
        assert res["passed"], res["failures"]
        enc = res["components"][component]
        assert enc["outputs"][output]["worst_cosine"] >= 0.999 and enc["engine"]["plugin"] is None
        assert (tmp_path / "engine" / component / engine).is_file()
        cfg = json.loads((tmp_path / "engine" / component / "config.json").read_text())
        if family == "phi4mm":
            assert cfg["builder_config"]["min_image_tokens"] == 256
            assert (tmp_path / "engine" / "visual" / "phi4mm_gn_proj.safetensors").read_bytes() == \
                (tmp_path / "out" / "visual" / "phi4mm_gn_proj.safetensors").read_bytes()
        else:
            assert cfg["builder_config"] == {"min_time_steps": 100, "max_time_steps": 6000}
            shapes = enc["engine"]["profile"][0]["shapes"]
            assert shapes["attention_mask"] == {"min": [1, 1], "opt": [390, 390], "max": [780, 780]}
    finally:
        fake_trt.reset()
