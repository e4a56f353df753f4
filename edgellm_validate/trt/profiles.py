"""The two optimization profiles Edge-LLM 0.7's `llm_build` gives a vanilla (dense, non-EAGLE) LLM.

Pure: computed from the exported `config.json` and the build limits, no TensorRT needed.
Contract: engine-build-and-containers.md §3.1-3.3 and text.md §8 (0.7.1 differs from 0.10:
the KV cache is one `[B, 2, Hkv, 0..Cap, D]` tensor per layer, there is no page table).

    B = max_batch_size, L = max_input_len, C = max_kv_cache_capacity, H = hidden_size,
    R = int(head_dim * partial_rotary_factor); shapes are min / opt / max.

    input                  context (profile 0)                 generation (profile 1)
    inputs_embeds          [1,1,H] / [B,L/2,H] / [B,L,H]       [1,1,H] / [B,1,H] / [B,1,H]
    context_lengths        [1] / [B] / [B]                     same
    kvcache_start_index    [0] / [B] / [B]                     [1] / [B] / [B]
    rope_rotary_cos_sin    [1,C,R] / [B,C,R] / [B,C,R]         same
    last_token_ids         [1,1] / [B,1] / [B,1]               same
    past_key_values_i      [1,2,Hkv,0,D] / [B,2,Hkv,C,D] / [B,2,Hkv,C,D]   same
    conv_state_j           [1,Cd,K] / [B,Cd,K] / [B,Cd,K]                  same    (hybrids)
    recurrent_state_j      [1,Hr,Dr,N] / [B,Hr,Dr,N] / [B,Hr,Dr,N]         same    (hybrids)
    deepstack_embeds_i     as inputs_embeds                    as inputs_embeds        (Qwen3-VL)

Qwen3-VL's `deepstack_embeds_i` (i < `num_deepstack_features`) get inputs_embeds' ranges, as
`LLMBuilder::setupDeepstackProfiles` gives them.

A hybrid (`model_type` hybrid_mamba) has a KV cache per attention layer only (`num_attention_layers`)
and a conv and a recurrent state per recurrent layer (`num_linear_attn_layers`; Cd = `conv_dim`,
K = `conv_kernel`, Hr / Dr / N = `recurrent_state_num_heads` / `_head_dim` / `_size`), as
`LLMBuilder::setupConvStateProfiles` / `setupRecurrentStateProfiles` set them.

A plugin-free export (`"trt_native_ops": true`, contract native.md) has separate K and V caches, set up by
`LLMBuilder::setupKVCacheProfiles` under useTrtNativeOps with the capacity fixed, not starting at 0:

    k_cache_i, v_cache_i   [1,Hkv,C,D] / [B,Hkv,C,D] / [B,Hkv,C,D]   same (context and generation)

and otherwise the same vanilla profiles (kvcache_start_index keeps its context min [0], though the native
runtime always binds [B]). Its graph fixes C (4096 in 0.7.1's exporter), so the engine must be built with
that capacity: `check_static_dims` refuses limits a graph's static dims contradict.

`L/2` is C++ integer division, as in llm_build. Profile order matters: TensorRT numbers
profiles in the order they are added, and the runtime selects 0 for prefill, 1 for decode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from edgellm_core.bindings import bindings_for
from edgellm_core.errors import ExportError, UnsupportedError

# llm_build 0.7.1 defaults (LLMBuilderConfig): --maxBatchSize 4, --maxInputLen 1024, --maxKVCacheCapacity 4096.
DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_MAX_INPUT_LEN = 1024
DEFAULT_MAX_KV_CACHE_CAPACITY = 4096

CONTEXT, GENERATION = "context", "generation"
PROFILE_ORDER = (CONTEXT, GENERATION)  # profile index = position here

# These profiles are 0.7's (unpaged cache); the names come from its contract.
_B = bindings_for("0.7")
INPUTS_EMBEDS, CONTEXT_LENGTHS, KVCACHE_START_INDEX = _B.inputs_embeds, _B.context_lengths, _B.kvcache_start_index
ROPE_COS_SIN, LAST_TOKEN_IDS, LOGITS = _B.rope_cos_sin, _B.last_token_ids, _B.logits
PAST_KV, PRESENT_KV = _B.past_kv, _B.present_kv

# config.json `model_type` values whose profiles differ from the vanilla ones (EAGLE/MTP/hybrid).
_NON_VANILLA = {"eagle3_base", "eagle3_draft", "mtp_base", "mtp_draft"}
HYBRID = "hybrid_mamba"


class ShapeRange(NamedTuple):
    """min / opt / max dims of one input in one profile (what `IOptimizationProfile.set_shape` takes)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


Profiles = dict[str, dict[str, ShapeRange]]  # profile name (in PROFILE_ORDER) -> input name -> range


class ProfileError(ExportError):
    """Build limits or config that llm_build would turn into an invalid or different engine."""


@dataclass(frozen=True)
class BuildLimits:
    """`llm_build` limits, under the names it writes into the engine's `builder_config`."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_input_len: int = DEFAULT_MAX_INPUT_LEN
    max_kv_cache_capacity: int = DEFAULT_MAX_KV_CACHE_CAPACITY
    max_lora_rank: int = 0

    def builder_config(self, trt_native_ops: bool = False) -> dict:
        """The `builder_config` object llm_build 0.7.1 adds to the engine directory's config.json (it copies
        `trt_native_ops` from the export's config.json)."""
        return {
            "max_input_len": self.max_input_len,
            "eagle_draft": False,
            "eagle_base": False,
            "max_batch_size": self.max_batch_size,
            "max_lora_rank": self.max_lora_rank,
            "max_kv_cache_capacity": self.max_kv_cache_capacity,
            "trt_native_ops": bool(trt_native_ops),
        }

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelDims:
    """What llm_build reads from config.json to size the profiles."""

    hidden_size: int
    num_key_value_heads: int
    head_dim: int
    rotary_dim: int
    num_kv_inputs: int  # = num_hidden_layers for a dense decoder, num_attention_layers for a hybrid
    num_recurrent: int = 0  # hybrids: layers with a conv and a recurrent state
    conv_state: tuple[int, int] = (0, 0)  # (conv_dim, conv_kernel)
    recurrent_state: tuple[int, int, int] = (0, 0, 0)  # (heads, head_dim, state size)
    native: bool = False  # trt_native_ops: separate K / V caches of fixed capacity
    num_deepstack: int = 0  # Qwen3-VL: deepstack_embeds_i inputs


def check_limits(limits: BuildLimits) -> None:
    """Refuse limits for which llm_build would set an invalid profile, or the runtime refuses the engine."""
    for name in ("max_batch_size", "max_input_len", "max_kv_cache_capacity"):
        value = getattr(limits, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProfileError(f"build limit {name} must be a positive integer, not {value!r}")
    if isinstance(limits.max_lora_rank, bool) or not isinstance(limits.max_lora_rank, int) \
            or limits.max_lora_rank < 0:
        raise ProfileError(f"build limit max_lora_rank must be a non-negative integer, not {limits.max_lora_rank!r}")
    if limits.max_lora_rank > 0:
        raise UnsupportedError("max_lora_rank > 0 makes llm_build parse lora_model.onnx with LoRA profiles; "
                               "exports from this tool have no LoRA inputs")
    if limits.max_input_len < 2:
        raise ProfileError(
            f"max_input_len {limits.max_input_len} gives a context profile whose opt length "
            f"(max_input_len / 2 = {limits.max_input_len // 2}) is below its min length 1; TensorRT rejects "
            "such a profile (llm_build fails the same way); use max_input_len >= 2")
    if limits.max_input_len > limits.max_kv_cache_capacity:
        raise ProfileError(
            f"max_input_len {limits.max_input_len} exceeds max_kv_cache_capacity "
            f"{limits.max_kv_cache_capacity}; the Edge-LLM runtime refuses such an engine at load")


def _int_field(config: dict, key: str, where, *, required: bool = True, default: int | None = None) -> int:
    if key not in config or config[key] is None:
        if required:
            raise ProfileError(f"config.json has no {key!r}, which llm_build requires", where)
        return default
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProfileError(f"config.json {key!r} must be a positive integer, not {value!r}", where)
    return value


def model_dims(config: dict, where: str | Path | None = None) -> ModelDims:
    """The dims llm_build 0.7.1 (`LLMBuilder::parseConfig`) takes from the exported config.json."""
    native = config.get("trt_native_ops") is True
    if config.get("trt_native_ops") not in (None, False, True):
        raise ProfileError(f"config.json trt_native_ops must be true or false, not {config['trt_native_ops']!r}",
                           where)
    if native and (config.get("model_type") == HYBRID or config.get("num_linear_attn_layers")):
        raise UnsupportedError("config.json sets trt_native_ops for a hybrid model: 0.7.1's native path covers "
                               "vanilla dense decoders only", where)
    if config.get("model_type") in _NON_VANILLA:
        raise UnsupportedError(f"config.json model_type {config['model_type']!r}: only vanilla LLM profiles "
                               "(model_type 'llm') are implemented", where)
    deepstack = config.get("num_deepstack_features") or 0
    if isinstance(deepstack, bool) or not isinstance(deepstack, int) or deepstack < 0:
        raise ProfileError(f"config.json num_deepstack_features must be a non-negative integer, not {deepstack!r}",
                           where)
    if deepstack and native:
        raise UnsupportedError("config.json sets trt_native_ops with deepstack inputs: 0.7.1's native path covers "
                               "vanilla decoding only", where)
    hidden = _int_field(config, "hidden_size", where)
    heads = _int_field(config, "num_attention_heads", where)
    kv_heads = _int_field(config, "num_key_value_heads", where)
    layers = _int_field(config, "num_hidden_layers", where)
    head_dim = _int_field(config, "head_dim", where, required=False, default=hidden // heads)
    if head_dim < 1:
        raise ProfileError(f"head_dim falls back to hidden_size // num_attention_heads = {head_dim}", where)
    factor = config.get("partial_rotary_factor", 1.0)
    if factor is None:
        factor = 1.0
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise ProfileError(f"config.json partial_rotary_factor must be in (0, 1], not {factor!r}", where)
    rotary = int(head_dim * factor)
    if rotary < 1:
        raise ProfileError(f"rotary dim int(head_dim * partial_rotary_factor) = {rotary}", where)
    recurrent = config.get("num_linear_attn_layers") or 0
    if config.get("model_type") != HYBRID or not recurrent:
        return ModelDims(hidden, kv_heads, head_dim, rotary, layers, native=native, num_deepstack=deepstack)
    recurrent = _int_field(config, "num_linear_attn_layers", where)
    return ModelDims(hidden, kv_heads, head_dim, rotary, num_deepstack=deepstack,
                     num_kv_inputs=config.get("num_attention_layers", layers),
                     num_recurrent=recurrent,
                     conv_state=(_int_field(config, "conv_dim", where), _int_field(config, "conv_kernel", where)),
                     recurrent_state=tuple(_int_field(config, f"recurrent_state_{k}", where)
                                           for k in ("num_heads", "head_dim", "size")))


def input_names(config: dict) -> list[str]:
    """The graph inputs a vanilla 0.7 export has (and llm_build sets a profile for), in export order."""
    dims = model_dims(config)
    if dims.native:  # NVIDIA's native order (native.md)
        layers = range(dims.num_kv_inputs)
        return [INPUTS_EMBEDS, ROPE_COS_SIN, CONTEXT_LENGTHS, LAST_TOKEN_IDS, *(_B.native_kv(i)[0] for i in layers),
                *(_B.native_kv(i)[1] for i in layers), KVCACHE_START_INDEX]
    return [INPUTS_EMBEDS, *(PAST_KV.format(i) for i in range(dims.num_kv_inputs)), ROPE_COS_SIN, CONTEXT_LENGTHS,
            KVCACHE_START_INDEX, LAST_TOKEN_IDS, *(_B.deepstack(i) for i in range(dims.num_deepstack)),
            *(_B.conv(j)[0] for j in range(dims.num_recurrent)),
            *(_B.recurrent(j)[0] for j in range(dims.num_recurrent))]


def optimization_profiles(config: dict, limits: BuildLimits | None = None,
                          where: str | Path | None = None) -> Profiles:
    """`{"context": {input: ShapeRange}, "generation": {...}}`, in profile order, as llm_build 0.7.1 sets them."""
    limits = limits or BuildLimits()
    check_limits(limits)
    dims = model_dims(config, where)
    b, seq, cap = limits.max_batch_size, limits.max_input_len, limits.max_kv_cache_capacity
    h, hkv, d, r = dims.hidden_size, dims.num_key_value_heads, dims.head_dim, dims.rotary_dim

    def rng(mn, opt, mx) -> ShapeRange:
        return ShapeRange(tuple(mn), tuple(opt), tuple(mx))

    common = {
        CONTEXT_LENGTHS: rng([1], [b], [b]),
        ROPE_COS_SIN: rng([1, cap, r], [b, cap, r], [b, cap, r]),
        LAST_TOKEN_IDS: rng([1, 1], [b, 1], [b, 1]),
    }
    if dims.native:  # setupKVCacheProfiles, useTrtNativeOps: the capacity is fixed, min batch 1
        nkv = _B.native_kv_cache_dims
        full = rng(nkv(1, hkv, cap, d), nkv(b, hkv, cap, d), nkv(b, hkv, cap, d))
        kv = {name: full for i in range(dims.num_kv_inputs) for name in _B.native_kv(i)}
    else:
        kvd = _B.kv_cache_dims
        kv = {PAST_KV.format(i): rng(kvd(1, hkv, 0, d), kvd(b, hkv, cap, d), kvd(b, hkv, cap, d))
              for i in range(dims.num_kv_inputs)}
    for j in range(dims.num_recurrent):  # fixed dims after the batch
        conv = _B.conv_state_dims
        kv[_B.conv(j)[0]] = rng(conv(1, *dims.conv_state), conv(b, *dims.conv_state), conv(b, *dims.conv_state))
    for j in range(dims.num_recurrent):
        rec = _B.recurrent_state_dims
        kv[_B.recurrent(j)[0]] = rng(rec(1, *dims.recurrent_state), rec(b, *dims.recurrent_state),
                                     rec(b, *dims.recurrent_state))
    embeds = {CONTEXT: rng([1, 1, h], [b, seq // 2, h], [b, seq, h]), GENERATION: rng([1, 1, h], [b, 1, h], [b, 1, h])}
    deepstack = [_B.deepstack(i) for i in range(dims.num_deepstack)]  # inputs_embeds' ranges
    context = {
        INPUTS_EMBEDS: embeds[CONTEXT], **{name: embeds[CONTEXT] for name in deepstack},
        # Shape [0] is the runtime's "fresh prefill, empty cache" sentinel.
        KVCACHE_START_INDEX: rng([0], [b], [b]),
        **common, **kv,
    }
    generation = {
        INPUTS_EMBEDS: embeds[GENERATION], **{name: embeds[GENERATION] for name in deepstack},
        KVCACHE_START_INDEX: rng([1], [b], [b]),
        **common, **kv,
    }
    profiles = {CONTEXT: context, GENERATION: generation}
    for pname, shapes in profiles.items():
        for name, s in shapes.items():
            if not all(lo <= mid <= hi for lo, mid, hi in zip(s.min, s.opt, s.max)):
                raise ProfileError(f"{pname} profile of {name}: min {s.min} / opt {s.opt} / max {s.max} "
                                   "is not ordered", where)
    return profiles


def check_inputs_covered(profiles: Profiles, network_inputs: list[str]) -> None:
    """llm_build fails on a network input without a profile; a profile for a missing input is our bug."""
    for pname, shapes in profiles.items():
        extra = [n for n in network_inputs if n not in shapes]
        missing = [n for n in shapes if n not in network_inputs]
        if extra:
            raise UnsupportedError(f"the graph has inputs with no {pname} profile in a vanilla 0.7 build: "
                                   f"{', '.join(extra)} (llm_build would refuse it too)")
        if missing:
            raise ProfileError(f"the graph lacks inputs the 0.7 profiles expect: {', '.join(missing)}")


def check_static_dims(profiles: Profiles, graph_inputs: dict[str, list[int | str]]) -> None:
    """A dim the graph fixes must be pinned to that value in every profile, or TensorRT refuses the build: for a
    native export, the K/V caches' static capacity (4096 in 0.7.1) against --maxKVCacheCapacity.
    `graph_inputs`: input name -> dims (int for a fixed dim, a name for a symbolic one)."""
    for pname, shapes in profiles.items():
        for name, dims in graph_inputs.items():
            s = shapes.get(name)
            if s is None:
                continue
            for k, dim in enumerate(dims):
                if isinstance(dim, int) and k < len(s.min) and not s.min[k] == s.opt[k] == s.max[k] == dim:
                    hint = (" (the native export's static KV capacity: build with max_kv_cache_capacity "
                            f"{dim})") if _B.native_kv_ordinal(name) is not None and k == 2 else ""
                    raise ProfileError(f"{pname} profile of {name}: dim {k} is {dim} in the graph, but the profile "
                                       f"gives {s.min[k]} / {s.opt[k]} / {s.max[k]}{hint}")


def profiles_to_json(profiles: Profiles) -> list[dict]:
    """Plain JSON for the build record: `[{"index", "name", "shapes": {input: {"min", "opt", "max"}}}]`."""
    return [{"index": i, "name": name,
             "shapes": {inp: {"min": list(s.min), "opt": list(s.opt), "max": list(s.max)}
                        for inp, s in profiles[name].items()}}
            for i, name in enumerate(profiles)]  # dict order is profile order (context, generation for an LLM)


def limits_for_bundle(meta: dict, base: BuildLimits | None = None) -> BuildLimits:
    """Limits for an engine that can replay a golden bundle through the runtime twin.

    The twin feeds a RoPE table and KV buffers of exactly the bundle's `kv_capacity`, and the
    profiles fix that dim to the capacity, so the engine must be built with that capacity.
    Batch keeps llm_build's default unless a scenario needs more; the input length is capped by
    the capacity (the runtime refuses max_input_len > capacity) and must cover every prefill step.
    """
    base = base or BuildLimits()
    cap = int(meta["kv_capacity"])
    batch = max_len = 1
    for sc in meta["scenarios"]:
        for st in sc["steps"]:
            batch = max(batch, len(st["context_lengths"]))
            max_len = max(max_len, max((len(row) for row in st["token_ids"]), default=1))
    limits = BuildLimits(max_batch_size=max(base.max_batch_size, batch),
                         max_input_len=max(min(base.max_input_len, cap), max_len, 2),
                         max_kv_cache_capacity=cap, max_lora_rank=base.max_lora_rank)
    check_limits(limits)
    return limits
