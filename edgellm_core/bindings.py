"""The runtime's graph bindings per Edge-LLM release: the only place their names (and the KV cache's
layout) are spelled.

The exporter declares them, and the golden pass, the CPU twin, `edgellm run`, the TensorRT profiles and
runner, and the target checks bind them, all through `bindings_for(release)`. Torch- and onnx-free, so
a device imports it cheaply. (`tests/test_bindings_single_home.py` fails on a binding name written
anywhere else in the packages.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Bindings:
    release: str
    inputs_embeds: str
    rope_cos_sin: str
    context_lengths: str
    kvcache_start_index: str
    last_token_ids: str
    logits: str
    past_kv: str  # format with the attention ordinal
    present_kv: str
    conv_state: str  # hybrids: format with the recurrent-layer ordinal
    present_conv_state: str
    recurrent_state: str
    present_recurrent_state: str
    # `trt_native_ops` exports (contract native.md): separate K and V caches per attention layer.
    k_cache: str  # format with the attention ordinal
    v_cache: str
    present_k_cache: str
    present_v_cache: str
    # Qwen3-VL: the visual tower's deepstack features, added to the residual after decoder layer i.
    deepstack_embeds: str  # format with the layer index

    def past(self, i: int) -> str:
        return self.past_kv.format(i)

    def present(self, i: int) -> str:
        return self.present_kv.format(i)

    def conv(self, i: int) -> tuple[str, str]:
        """(input, output) names of recurrent layer i's conv state."""
        return self.conv_state.format(i), self.present_conv_state.format(i)

    def recurrent(self, i: int) -> tuple[str, str]:
        """(input, output) names of recurrent layer i's recurrent (SSM / delta-rule) state."""
        return self.recurrent_state.format(i), self.present_recurrent_state.format(i)

    def deepstack(self, i: int) -> str:
        """The per-step input added to the hidden states after decoder layer i (`[batch, seq_len, hidden]`
        fp16, zeros on text positions; families.md §0.1)."""
        return self.deepstack_embeds.format(i)

    def deepstack_ordinal(self, name: str) -> int | None:
        """i for `deepstack_embeds_i`, else None."""
        m = re.fullmatch(self.deepstack_embeds.replace("{}", r"(\d+)"), name)
        return int(m.group(1)) if m else None

    def native_kv(self, i: int) -> tuple[str, str]:
        """(K, V) cache input names of attention layer i in a `trt_native_ops` export."""
        return self.k_cache.format(i), self.v_cache.format(i)

    def native_present_kv(self, i: int) -> tuple[str, str]:
        """(K, V) cache output names of attention layer i in a `trt_native_ops` export (bound by the runtime to
        the same buffers as the inputs)."""
        return self.present_k_cache.format(i), self.present_v_cache.format(i)

    @staticmethod
    def native_kv_cache_dims(batch, num_kv_heads: int, capacity, head_dim: int) -> tuple:
        """One K (or V) cache of a `trt_native_ops` export, `[batch, kv_heads, capacity, head_dim]`: no "2" axis,
        and a static capacity in the graph (native.md)."""
        return (batch, num_kv_heads, capacity, head_dim)

    @staticmethod
    def conv_state_dims(batch, conv_dim: int, conv_kernel: int) -> tuple:
        """A recurrent layer's conv state, `[batch, conv_dim, conv_kernel]`: the last `conv_kernel` inputs
        (the full kernel width, not width - 1; families.md §3)."""
        return (batch, conv_dim, conv_kernel)

    @staticmethod
    def recurrent_state_dims(batch, heads: int, head_dim: int, state_size: int) -> tuple:
        """A recurrent layer's state, `[batch, heads, head_dim, state_size]` (Mamba2: Hm, Dm, Nst;
        GatedDeltaNet: Hv, Dk, Dv)."""
        return (batch, heads, head_dim, state_size)

    @property
    def step_inputs(self) -> tuple[str, ...]:
        """What the runtime computes for every call; every other graph input is carried state."""
        return (self.inputs_embeds, self.rope_cos_sin, self.context_lengths, self.kvcache_start_index,
                self.last_token_ids)

    @staticmethod
    def kv_cache_dims(batch, num_kv_heads: int, capacity, head_dim: int) -> tuple:
        """One attention layer's cache, `[batch, 2 (K, V), kv_heads, capacity, head_dim]` (0.7's unpaged
        layout; dims may be symbolic names). The plugin reads K at [:, 0] and V at [:, 1]."""
        return (batch, 2, num_kv_heads, capacity, head_dim)

    def presents_of(self, past: str) -> tuple[str, ...]:
        """The output names that can carry state input `past` to the next call: `present_N` for `N`,
        and `present_X` for `past_X` (past_key_values_i -> present_key_values_i; hybrids' conv_state_i ->
        present_conv_state_i; native exports' k_cache_i -> present_k_cache_i)."""
        return (f"present_{past}",) + ((f"present_{past[5:]}",) if past.startswith("past_") else ())

    def kv_ordinal(self, name: str, *, present: bool = False) -> int | None:
        """i for `past_key_values_i` (or `present_key_values_i`), else None."""
        pattern = (self.present_kv if present else self.past_kv).replace("{}", r"(\d+)")
        m = re.fullmatch(pattern, name)
        return int(m.group(1)) if m else None

    def native_kv_ordinal(self, name: str, *, present: bool = False) -> int | None:
        """i for `k_cache_i` / `v_cache_i` (or `present_k_cache_i` / `present_v_cache_i`), else None."""
        for fmt in (self.present_k_cache, self.present_v_cache) if present else (self.k_cache, self.v_cache):
            m = re.fullmatch(fmt.replace("{}", r"(\d+)"), name)
            if m:
                return int(m.group(1))
        return None


V0_7 = Bindings(
    release="0.7",
    inputs_embeds="inputs_embeds",
    rope_cos_sin="rope_rotary_cos_sin",
    context_lengths="context_lengths",
    kvcache_start_index="kvcache_start_index",
    last_token_ids="last_token_ids",
    logits="logits",
    past_kv="past_key_values_{}",
    present_kv="present_key_values_{}",
    conv_state="conv_state_{}",
    present_conv_state="present_conv_state_{}",
    recurrent_state="recurrent_state_{}",
    present_recurrent_state="present_recurrent_state_{}",
    k_cache="k_cache_{}",
    v_cache="v_cache_{}",
    present_k_cache="present_k_cache_{}",
    present_v_cache="present_v_cache_{}",
    deepstack_embeds="deepstack_embeds_{}",
)
RELEASES = {"0.7": V0_7}


def bindings_for(release: str | None = None) -> Bindings:
    """The bindings of an Edge-LLM release ("0.7", "0.7.1", ...; None: the only one so far)."""
    key = ".".join((release or "0.7").split(".")[:2])
    if key not in RELEASES:
        from edgellm_core.errors import ExportError

        raise ExportError(f"unknown Edge-LLM release {release!r}; supported: {', '.join(sorted(RELEASES))}")
    return RELEASES[key]
