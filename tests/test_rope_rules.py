"""RoPE fidelity: rewrites are exact against transformers' definitions; the rest is refused."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm_core.errors import UnsupportedError
from edgellm_export.config import ModelConfig, RopeSpec
from edgellm_export.contract import v0_7
from edgellm_validate.runtime_rules import RuntimeRefusal, rope_table


def cfg_with(rope_type="default", head_dim=64, prf=1.0, **params):
    return ModelConfig(model_type="llama", vocab_size=8, hidden_size=256, intermediate_size=8, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, rms_norm_eps=1e-5,
                       max_position_embeddings=2048, rope=RopeSpec(rope_type, 500000.0, params),
                       partial_rotary_factor=prf)


def hf_inv_freq(rope_type, head_dim, **params):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rp = {"rope_type": rope_type, "rope_theta": 500000.0, **params}
    c = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                 max_position_embeddings=2048, rope_parameters=rp)
    inv, scale = ROPE_INIT_FUNCTIONS[rope_type](c, "cpu")
    return inv.double().numpy(), scale


LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


@pytest.mark.parametrize("rope_type,params", [("llama3", LLAMA3), ("linear", {"factor": 4.0})])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rewrite_reproduces_hf_frequencies(rope_type, params, head_dim):
    cfg = cfg_with(rope_type, head_dim, **params)
    runtime = v0_7.runtime_config(cfg)
    scaling = runtime["rope_scaling"]
    assert scaling["type"] == "longrope" and scaling["short_factor"] == scaling["long_factor"]
    assert runtime["original_max_position_embeddings"] == runtime["max_position_embeddings"]
    assert scaling["converted_from"]["rope_type"] == rope_type
    # The runtime's table (built by its rules) equals the one from HF's frequencies.
    table = rope_table(runtime, 1024)[0]
    inv, scale = hf_inv_freq(rope_type, head_dim, **params)
    ang = np.arange(1024)[:, None] * inv[None]
    want = np.concatenate([np.cos(ang), np.sin(ang)], -1) * scale
    assert np.abs(table - want).max() < 2e-3  # fp32 angle rounding at position ~1000
    # And the passthrough table (what the reference exporter ships) is far off.
    wrong = rope_table(v0_7.runtime_config(cfg, allow_rope_passthrough=True), 1024)[0]
    assert np.abs(wrong - want).max() > 0.5


def test_default_rope_stays_default():
    fields = v0_7.runtime_config(cfg_with())
    assert fields["rope_scaling"]["type"] == "default" and fields["rope_theta"] == 500000.0
    assert "original_max_position_embeddings" not in fields


def test_rotary_dim_32_uses_longrope_with_unit_factors():
    fields = v0_7.runtime_config(cfg_with(head_dim=64, prf=0.5))
    assert fields["rope_scaling"]["type"] == "longrope"
    assert fields["rope_scaling"]["short_factor"] == [1.0] * 16
    # Unit-factor longrope equals the plain table HF would use.
    inv = 500000.0 ** (-np.arange(0, 32, 2) / 32)
    ang = np.arange(64)[:, None] * inv[None]
    np.testing.assert_allclose(rope_table(fields | {"head_dim": 64, "partial_rotary_factor": 0.5}, 64)[0],
                               np.concatenate([np.cos(ang), np.sin(ang)], -1), atol=1e-5)


@pytest.mark.parametrize("rope_type,params", [
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 512}),
    ("mystery", {}),
    ("longrope", {"short_factor": [1.0] * 32, "long_factor": [2.0] * 32, "original_max_position_embeddings": 512,
                  "attention_factor": 1.3}),
])
def test_inexpressible_types_are_refused(rope_type, params):
    with pytest.raises(UnsupportedError, match="0.7"):
        v0_7.runtime_config(cfg_with(rope_type, **params))


def test_unsupported_rotary_dim_refused():
    with pytest.raises(UnsupportedError, match="rotary dim 48"):
        v0_7.runtime_config(cfg_with(head_dim=64, prf=0.75))


def test_runtime_treats_unknown_types_as_default_and_checks_longrope():
    base = {"head_dim": 64, "rope_theta": 10000.0, "max_position_embeddings": 4096}
    plain = rope_table(base | {"rope_scaling": {"type": "default"}}, 32)
    for kind in ("llama3", "linear", "yarn"):
        assert np.array_equal(rope_table(base | {"rope_scaling": {"rope_type": kind, "factor": 8.0}}, 32), plain)
    with pytest.raises(RuntimeRefusal):
        rope_table(base | {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 32,
                                            "long_factor": [1.0] * 32}}, 32)
    with pytest.raises(RuntimeRefusal):
        rope_table(base | {"rope_scaling": {"type": "dynamic"}}, 8192)
