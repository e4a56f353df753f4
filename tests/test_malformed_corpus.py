"""A corpus of malformed checkpoints: each is refused with exit 2, a message naming the file and
the problem, and no output. Cases cover safetensors headers, index files, config.json,
quantization metadata, tokenizer files and tensors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from edgellm_export.cli import main
from edgellm_export.demo_checkpoint import write_demo_checkpoint

ST = "model.safetensors"


def _read_st(ckpt: Path) -> tuple[dict, bytes]:
    raw = (ckpt / ST).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_st(ckpt: Path, header, data: bytes, length: int | None = None) -> None:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    (ckpt / ST).write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def header_edit(fn):
    def apply(ckpt):
        header, data = _read_st(ckpt)
        fn(header)
        _write_st(ckpt, header, data)
    return apply


def config_edit(**changes):
    def apply(ckpt):
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg.update(changes)
        (ckpt / "config.json").write_text(json.dumps(cfg))
    return apply


def write(name, text):
    return lambda ckpt: (ckpt / name).write_text(text)


def sharded(mutate_index):
    """Split the demo into two shards with an index, then break the index."""
    def apply(ckpt):
        from safetensors.torch import load_file, save_file

        state = load_file(str(ckpt / ST))
        (ckpt / ST).unlink()
        names = sorted(state)
        half = len(names) // 2
        save_file({k: state[k] for k in names[:half]}, str(ckpt / "a.safetensors"))
        save_file({k: state[k] for k in names[half:]}, str(ckpt / "b.safetensors"))
        index = {"weight_map": {k: ("a.safetensors" if i < half else "b.safetensors") for i, k in enumerate(names)}}
        mutate_index(index)
        text = index if isinstance(index, str) else json.dumps(index)
        (ckpt / "model.safetensors.index.json").write_text(text)
    return apply


def _first(h):
    return next(k for k in h if k != "__metadata__")


def _set_first(key, value):
    return header_edit(lambda h: h[_first(h)].__setitem__(key, value))


def _del_first(key):
    return header_edit(lambda h: h[_first(h)].pop(key))


def _overlap(h):
    a, b = [k for k in h if k != "__metadata__"][:2]
    h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + (
        h[b]["data_offsets"][1] - h[b]["data_offsets"][0])]


def _retype_weight(h):
    meta = h["model.layers.0.mlp.up_proj.weight"]
    meta["dtype"] = "I8"
    meta["shape"] = [meta["shape"][0] * 2, meta["shape"][1]]


CASES = {
    # safetensors headers
    "st_header_len_past_eof": (lambda c: _write_st(c, {}, b"", length=10**6), ST, "does not fit"),
    "st_header_len_huge": (lambda c: _write_st(c, {}, b"", length=2**62), ST, "does not fit"),
    "st_header_not_json": (lambda c: _write_st(c, b"{not json", b""), ST, "does not parse"),
    "st_header_is_list": (lambda c: _write_st(c, b"[1, 2]  ", b""), ST, "not a JSON object"),
    "st_shorter_than_8": (lambda c: (c / ST).write_bytes(b"\x01\x02"), ST, "shorter than"),
    "st_entry_no_dtype": (_del_first("dtype"), ST, "lacks dtype"),
    "st_unknown_dtype": (_set_first("dtype", "Q4"), ST, "unsupported dtype"),
    "st_shape_vs_bytes": (_set_first("shape", [3, 3]), ST, "does not match shape"),
    "st_negative_offset": (_set_first("data_offsets", [-8, 0]), ST, "negative"),
    "st_offsets_past_eof": (_set_first("data_offsets", [10**9, 10**9 + 256]), ST, "does not match shape"),
    "st_overlap": (header_edit(_overlap), ST, "overlap"),
    "st_truncated": (lambda c: (c / ST).write_bytes((c / ST).read_bytes()[:-1000]), ST, "truncated"),
    # index files
    "idx_not_json": (lambda c: (sharded(lambda i: None)(c), write("model.safetensors.index.json", "{oops")(c)),
                     "model.safetensors.index.json", "not valid JSON"),
    "idx_no_weight_map": (sharded(lambda i: i.pop("weight_map")), "model.safetensors.index.json", "weight_map"),
    "idx_value_not_str": (sharded(lambda i: i["weight_map"].__setitem__("norm.weight", 3)),
                          "model.safetensors.index.json", "weight_map"),
    "idx_missing_shard": (sharded(lambda i: i["weight_map"].__setitem__("x", "c.safetensors")),
                          "model.safetensors.index.json", "missing"),
    "idx_dotdot": (sharded(lambda i: i["weight_map"].__setitem__("x", "../a.safetensors")),
                   "model.safetensors.index.json", "outside"),
    "idx_absolute": (sharded(lambda i: i["weight_map"].__setitem__("x", "/etc/passwd")),
                     "model.safetensors.index.json", "outside"),
    "idx_wrong_shard": (sharded(lambda i: i["weight_map"].__setitem__("model.norm.weight", "a.safetensors")
                                if i["weight_map"]["model.norm.weight"] == "b.safetensors"
                                else i["weight_map"].__setitem__("model.norm.weight", "b.safetensors")),
                        "model.safetensors.index.json", "does not contain"),
    # config.json
    "cfg_missing": (lambda c: (c / "config.json").unlink(), "config.json", "missing"),
    "cfg_not_json": (write("config.json", "{,}"), "config.json", "not valid JSON"),
    "cfg_list": (write("config.json", "[]"), "config.json", "JSON object"),
    "cfg_no_hidden": (lambda c: (config_edit()(c), _drop_cfg(c, "hidden_size")), "config.json", "hidden_size"),
    "cfg_layers_huge": (config_edit(num_hidden_layers=10**9), "config.json", "beyond any real model"),
    "cfg_heads_negative": (config_edit(num_attention_heads=-2), "config.json", "positive integer"),
    "cfg_heads_indivisible": (config_edit(num_key_value_heads=3), "config.json", "not a multiple"),
    "cfg_unknown_type": (config_edit(model_type="gpt_bigcode"), "config.json", "not supported"),
    "cfg_rope_yarn": (config_edit(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 128}),
                      "config.json", "yarn"),
    "cfg_head_dim_32": (config_edit(head_dim=32), "config.json", "head_dim 32"),
    "cfg_gelu": (config_edit(hidden_act="gelu"), "config.json", "hidden_act"),
    "cfg_partial_rotary": (config_edit(partial_rotary_factor=2.0), "config.json", "partial_rotary_factor"),
    # quantization metadata
    "quant_fp8": (write("hf_quant_config.json", json.dumps({"quantization": {"quant_algo": "FP8"}})),
                  "hf_quant_config.json", "FP8"),
    "quant_not_json": (write("hf_quant_config.json", "{"), "hf_quant_config.json", "not valid JSON"),
    "quant_in_config": (config_edit(quantization_config={"quant_method": "gptq", "bits": 4}), "config.json", "gptq"),
    # tokenizer files
    "tok_json_broken": (write("tokenizer.json", "{"), "tokenizer.json", "not valid JSON"),
    "tok_json_no_model": (write("tokenizer.json", "{}"), "tokenizer.json", "'model'"),
    "tok_config_broken": (write("tokenizer_config.json", "{"), "tokenizer_config.json", "not valid JSON"),
    "chat_template_no_roles": (write("processed_chat_template.json", "{}"), "processed_chat_template.json",
                               "roles"),
    # tensors
    "tensor_missing": (header_edit(lambda h: h.pop("model.norm.weight")), ST, "missing"),
    "tensor_wrong_shape": (header_edit(lambda h: h["model.norm.weight"].__setitem__("shape", [64, 2])), ST,
                           "shape"),
    "tensor_int8": (header_edit(_retype_weight), ST, "dtype I8"),
}


def _drop_cfg(ckpt: Path, key: str) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop(key)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_corpus_is_large_enough():
    assert len(CASES) >= 30
    kinds = {name.split("_")[0] for name in CASES}
    assert {"st", "idx", "cfg", "quant", "tok", "tensor"} <= kinds


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_is_refused(case, tmp_path, capsys):
    mutate, file_name, phrase = CASES[case]
    ckpt = write_demo_checkpoint(tmp_path / "ckpt")
    mutate(ckpt)
    out = tmp_path / "out"
    assert main(["-q", "export", str(ckpt), str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("edgellm: error: ")
    assert len(err.strip().splitlines()) == 1, err
    assert file_name in err, err
    assert phrase in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
