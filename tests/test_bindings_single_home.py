"""The runtime's binding names are spelled in one place per release (contract/bindings.py); everything
else (exporter, golden, twin, `edgellm run`, TensorRT profiles and runner, target checks) gets them from
there, so a new release or a renamed binding is one edit, not a hunt."""

from __future__ import annotations

import ast
from pathlib import Path

from edgellm_core.bindings import V0_7, bindings_for

ROOT = Path(__file__).resolve().parents[1]
NAMES = {V0_7.inputs_embeds, V0_7.rope_cos_sin, V0_7.context_lengths, V0_7.kvcache_start_index,
         V0_7.last_token_ids, V0_7.logits}
PREFIXES = tuple(f.split("{")[0] for f in (V0_7.past_kv, V0_7.present_kv, V0_7.conv_state, V0_7.present_conv_state,
                                           V0_7.recurrent_state, V0_7.present_recurrent_state, V0_7.k_cache,
                                           V0_7.v_cache, V0_7.present_k_cache, V0_7.present_v_cache))
# Files where these strings are something else that merely shares the word.
NOT_BINDINGS = {
    "edgellm_core/bindings.py": "the one home",
    "edgellm_core/ops/attention_plugin.py": "the plugin's formal input names (its ONNX schema)",
    "edgellm_core/ops/causal_conv1d.py": "the plugin's formal input names (its ONNX schema)",
    "edgellm_core/ops/gated_delta_net.py": "the plugin's formal input names (its ONNX schema)",
    "edgellm_core/ops/update_ssm_state.py": "the plugin's formal input names (its ONNX schema)",
    "edgellm_export/golden.py": "golden bundle JSON fields, named after the inputs they replay",
    "edgellm_validate/twin.py": "reads those golden bundle fields",
    "edgellm_validate/smoke_engine.py": "writes a scenario in the golden bundle's format for the twin",
    "edgellm_validate/trt/profiles.py": "reads those golden bundle fields (batch size of a step)",
}


def _strings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def _numbered(text: str, prefix: str) -> bool:
    """`past_key_values_3`, `conv_state_`, `present_recurrent_state_{}`: a binding name or its pattern (not
    a config field that merely starts the same, like `recurrent_state_num_heads`)."""
    rest = text[len(prefix):] if text.startswith(prefix) else None
    return rest is not None and (rest == "" or rest.isdigit() or rest.startswith("{"))


def test_binding_names_live_in_the_contract_only():
    offenders = []
    for pkg in ("edgellm_core", "edgellm_export", "edgellm_validate"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for line, text in _strings(ast.parse(path.read_text())):
                hit = text in NAMES or any(_numbered(text, prefix) for prefix in PREFIXES)
                if hit and rel not in NOT_BINDINGS:
                    offenders.append(f"{rel}:{line}: {text!r}")
    assert offenders == []


def test_bindings_lookup():
    b = bindings_for("0.7.1")
    assert b is V0_7 and b.past(3) == "past_key_values_3" and b.present(3) == "present_key_values_3"
    assert b.kv_ordinal("past_key_values_12") == 12 and b.kv_ordinal("present_key_values_1") is None
    assert b.kv_ordinal("present_key_values_1", present=True) == 1
    assert b.presents_of("past_key_values_0") == ("present_past_key_values_0", "present_key_values_0")
    assert b.presents_of("conv_state_2") == ("present_conv_state_2",)
    assert b.conv(2) == ("conv_state_2", "present_conv_state_2")
    assert b.recurrent(0) == ("recurrent_state_0", "present_recurrent_state_0")
    for past, present in (b.conv(1), b.recurrent(1)):  # the twin's carried-state rule pairs them
        assert present in b.presents_of(past)
    # trt_native_ops exports (contract native.md)
    assert b.native_kv(2) == ("k_cache_2", "v_cache_2")
    assert b.native_present_kv(2) == ("present_k_cache_2", "present_v_cache_2")
    for past, present in zip(b.native_kv(4), b.native_present_kv(4)):
        assert present in b.presents_of(past)
    assert b.native_kv_ordinal("v_cache_7") == 7 and b.native_kv_ordinal("present_v_cache_7") is None
    assert b.native_kv_ordinal("present_k_cache_3", present=True) == 3 and b.kv_ordinal("k_cache_1") is None
    assert b.native_kv_cache_dims("batch", 2, 4096, 64) == ("batch", 2, 4096, 64)
