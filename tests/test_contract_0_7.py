"""The exported ONNX and sidecars, read back and held against contract/edgellm-0.7/text.md."""

from __future__ import annotations

import json
import struct

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgellm_export.export import ExportOptions, export_checkpoint


def dims(vi):
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def qwen3_export(hf_checkpoints, tmp_path_factory):
    ckpt, model = hf_checkpoints("qwen3")
    out = tmp_path_factory.mktemp("contract") / "out"
    export_checkpoint(ckpt, out)
    return out / "llm", model.config


def test_model_level_facts(qwen3_export):
    llm, _ = qwen3_export
    m = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    assert m.ir_version == 10
    assert {o.domain: o.version for o in m.opset_import} == {"": 24, "trt_edgellm": 1}
    assert len(m.functions) == 0
    # With our schemas registered the checker also type-checks the AttentionPlugin nodes.
    from edgellm_core.ops import register_schemas

    register_schemas()
    onnx.checker.check_model(str(llm / "model.onnx"), full_check=True)
    broken = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    plugin = next(nd for nd in broken.graph.node if nd.op_type == "AttentionPlugin")
    plugin.input[5] = "context_lengths"  # an int32 tensor where the fp32 RoPE table belongs
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.shape_inference.infer_shapes(broken, check_type=True, strict_mode=True)


def test_graph_inputs_and_outputs(qwen3_export):
    llm, c = qwen3_export
    m = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    n, h, hkv, d, v = c.num_hidden_layers, c.hidden_size, c.num_key_value_heads, c.head_dim, c.vocab_size
    want_in = [("inputs_embeds", TensorProto.FLOAT16, ["batch", "seq_len", h])]
    want_in += [(f"past_key_values_{i}", TensorProto.FLOAT16, ["batch", 2, hkv, "past_len", d]) for i in range(n)]
    want_in += [
        ("rope_rotary_cos_sin", TensorProto.FLOAT, ["rope_batch", "max_pos", d]),
        ("context_lengths", TensorProto.INT32, ["batch"]),
        ("kvcache_start_index", TensorProto.INT32, ["kv_batch"]),
        ("last_token_ids", TensorProto.INT64, ["batch", 1]),
    ]
    got_in = [(i.name, i.type.tensor_type.elem_type, dims(i)) for i in m.graph.input]
    assert got_in == want_in
    outs = m.graph.output
    assert outs[0].name == "logits" and outs[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert dims(outs[0]) == ["batch", 1, v]
    assert [o.name for o in outs[1:]] == [f"present_key_values_{i}" for i in range(n)]
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT16 for o in outs[1:])
    # Dim-name grouping (§2.4): the names that must stay distinct are distinct.
    assert len({"batch", "seq_len", "past_len", "rope_batch", "max_pos", "kv_batch"}) == 6
    assert not any(i.name == "input_ids" for i in m.graph.input)
    assert not any(nd.op_type == "Gather" for nd in m.graph.node)  # no embedding lookup in the graph


def test_attention_plugin_nodes(qwen3_export):
    llm, c = qwen3_export
    m = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    plugins = [nd for nd in m.graph.node if nd.op_type == "AttentionPlugin"]
    assert len(plugins) == c.num_hidden_layers
    for i, nd in enumerate(plugins):
        assert nd.domain == "trt_edgellm"
        assert len(nd.input) == 7 and all(nd.input)
        assert nd.input[3] == f"past_key_values_{i}"
        assert list(nd.input[4:]) == ["context_lengths", "rope_rotary_cos_sin", "kvcache_start_index"]
        attrs = {a.name: a for a in nd.attribute}
        for name in ("num_q_heads", "num_kv_heads", "head_size", "enable_tree_attention",
                     "enable_fp8_kv_cache", "sliding_window_size"):
            assert attrs[name].type == onnx.AttributeProto.INT, name
        vals = {k: helper.get_attribute_value(a) for k, a in attrs.items()}
        assert (vals["num_q_heads"], vals["num_kv_heads"], vals["head_size"]) == (
            c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        assert vals["enable_tree_attention"] == 0 and vals["enable_fp8_kv_cache"] == 0
        assert vals["qkv_scales"] == [1.0, 1.0, 1.0]
    # The plugin's second output is the graph output itself, as the runtime's in-place KV binding
    # expects: no node (not even an Identity) between them, and no other graph output is a copy.
    for i, nd in enumerate(plugins):
        assert nd.output[1] == f"present_key_values_{i}"
    assert not any(nd.op_type == "Identity" for nd in m.graph.node)


def test_qk_norm_precedes_plugin_and_logits_via_gathernd(qwen3_export):
    llm, _ = qwen3_export
    m = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    ops = [nd.op_type for nd in m.graph.node]
    assert ops.count("GatherND") == 1
    gnd = next(nd for nd in m.graph.node if nd.op_type == "GatherND")
    assert helper.get_attribute_value(gnd.attribute[0]) == 1
    out_of = {o: nd for nd in m.graph.node for o in nd.output}
    logits_src = out_of["logits"]  # the Cast names the graph output itself
    assert logits_src.op_type == "Cast" and helper.get_attribute_value(logits_src.attribute[0]) == TensorProto.FLOAT
    assert out_of[logits_src.input[0]].op_type == "MatMul"
    # Qwen3: the q input of the plugin comes out of a RMSNorm (…Mul → Reshape).
    plugin = next(nd for nd in m.graph.node if nd.op_type == "AttentionPlugin")
    assert out_of[plugin.input[0]].op_type == "Reshape"
    assert out_of[out_of[plugin.input[0]].input[0]].op_type == "Mul"


def test_weights_are_fp16_in_one_external_file(qwen3_export):
    llm, c = qwen3_export
    m = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    data_size = (llm / "model.onnx.data").stat().st_size
    external = [t for t in m.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "model.onnx.data"
        assert int(info["offset"]) + int(info["length"]) <= data_size
        assert t.data_type == TensorProto.FLOAT16
    assert all(t.data_type != TensorProto.BFLOAT16 for t in m.graph.initializer)
    # Linear weights are pre-transposed [in, out]; tied lm_head is its own initializer.
    shapes = {t.name: list(t.dims) for t in external}
    assert [c.hidden_size, c.vocab_size] in shapes.values()
    # No large initializer is inline.
    assert all(t.data_location == TensorProto.EXTERNAL for t in m.graph.initializer if len(t.raw_data) > 1024)


def test_runtime_config_json(qwen3_export):
    llm, c = qwen3_export
    cfg = json.loads((llm / "config.json").read_text())
    assert cfg["model"] == "qwen3" and cfg["model_type"] == "llm"
    assert cfg["edgellm_version"] == "0.7.1" and cfg["trt_native_ops"] is False
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings"):
        assert cfg[key] == getattr(c, key), key
    assert cfg["rope_theta"] == c.rope_parameters["rope_theta"]
    assert cfg["rope_scaling"]["type"] == "default"
    assert cfg["partial_rotary_factor"] == 1.0 and cfg["num_deepstack_features"] == 0


def _safetensors_header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def test_embedding_sidecar_fp16(qwen3_export, hf_checkpoints):
    llm, c = qwen3_export
    header, data = _safetensors_header(llm / "embedding.safetensors")
    assert set(header) == {"embedding"}
    assert header["embedding"]["dtype"] == "F16" and header["embedding"]["shape"] == [c.vocab_size, c.hidden_size]
    _, model = hf_checkpoints("qwen3")
    table = np.frombuffer(data, np.float16).reshape(c.vocab_size, c.hidden_size)
    want = model.get_input_embeddings().weight.detach().numpy().astype(np.float16)
    assert np.array_equal(table, want)


def test_tokenizer_and_chat_template_sidecars(tmp_path):
    from edgellm_export.demo_checkpoint import write_demo_checkpoint

    ckpt = write_demo_checkpoint(tmp_path / "ckpt")
    export_checkpoint(ckpt, tmp_path / "out")
    llm = tmp_path / "out" / "llm"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (llm / name).read_bytes() == (ckpt / name).read_bytes()
    tmpl = json.loads((llm / "processed_chat_template.json").read_text())
    assert tmpl["roles"]["user"] == {"prefix": "<|im_start|>user\n", "suffix": "<|im_end|>\n"}
    assert tmpl["generation_prompt"] == "<|im_start|>assistant\n"
    assert tmpl["default_system_prompt"] == "You are a helpful assistant."


def test_fp8_embedding_sidecar(tmp_path):
    import ml_dtypes

    from edgellm_export.demo_checkpoint import write_demo_checkpoint
    from edgellm_validate.validate import validate_export

    ckpt = write_demo_checkpoint(tmp_path / "ckpt")
    export_checkpoint(ckpt, tmp_path / "out", ExportOptions(fp8_embedding=True))
    llm = tmp_path / "out" / "llm"
    header, data = _safetensors_header(llm / "embedding.safetensors")
    v, h = json.loads((llm / "config.json").read_text())["vocab_size"], 128
    assert header["embedding"]["dtype"] == "F8_E4M3" and header["embedding"]["shape"] == [v, h]
    assert header["embedding_scale"]["dtype"] == "F32" and header["embedding_scale"]["shape"] == [v, h // 128]
    a, b = header["embedding_scale"]["data_offsets"]
    scale = np.frombuffer(data[a:b], np.float32).reshape(v, h // 128)
    a, b = header["embedding"]["data_offsets"]
    q = np.frombuffer(data[a:b], ml_dtypes.float8_e4m3fn).reshape(v, h).astype(np.float32)
    # Independent recomputation of the documented rule from the checkpoint.
    from safetensors.torch import load_file

    src = load_file(str(ckpt / "model.safetensors"))["model.embed_tokens.weight"].float().numpy()
    want_scale = np.maximum(np.abs(src).reshape(v, -1, 128).max(-1), 1e-4) / 448.0
    np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
    assert np.abs(q).max() <= 448.0
    deq = (q.reshape(v, -1, 128) * scale[..., None]).reshape(v, h)
    assert np.abs(deq - src).max() <= np.abs(src).max() * 2**-3  # e4m3 has 3 mantissa bits
    res = validate_export(tmp_path / "out")
    assert res["passed"] and res["precision"] == "fp8_embedding"


def test_export_is_deterministic(tmp_path):
    from edgellm_export.demo_checkpoint import write_demo_checkpoint

    ckpt = write_demo_checkpoint(tmp_path / "ckpt")
    export_checkpoint(ckpt, tmp_path / "a")
    export_checkpoint(ckpt, tmp_path / "b")
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) >= 9
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_every_exported_file_is_readable_by_others(tmp_path):
    """The artifact is copied to devices and into containers running as other users."""
    import stat

    from edgellm_export.demo_checkpoint import write_demo_checkpoint

    export_checkpoint(write_demo_checkpoint(tmp_path / "ckpt"), tmp_path / "out")
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) >= 10
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044, p
