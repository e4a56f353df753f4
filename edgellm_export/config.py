"""ModelConfig: the normalised architecture, from config.json plus tensor names.

config.json comes in two dialects: legacy (`rope_scaling`, top-level
`rope_theta`) and transformers 5 (`rope_parameters` holding theta and type).
Feature flags that config.json does not state reliably (q/k norm, biases) are
inferred from which tensors exist, as the runtime's reference exporter does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgellm_core.errors import ExportError


@dataclass(frozen=True)
class RopeSpec:
    """What the checkpoint means by its rotary embedding."""

    rope_type: str  # default, linear, llama3, dynamic, longrope, yarn, ...
    theta: float
    params: dict[str, Any] = field(default_factory=dict)  # the rest of the HF dict


@dataclass(frozen=True)
class MoeSpec:
    """A sparse MoE MLP: softmax router over `num_experts`, top-k, optional renormalisation."""

    num_experts: int
    top_k: int
    intermediate_size: int
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    norm_topk_prob: bool = False


@dataclass(frozen=True)
class GdnSpec:
    """Qwen3.5's GatedDeltaNet mixer (families.md §3.2): `Hk` key heads of `Dk`, `Hv` value heads of `Dv`,
    a depthwise causal conv of width `conv_kernel` over q, k and v together."""

    num_k_heads: int
    num_v_heads: int
    k_head_dim: int
    v_head_dim: int
    conv_kernel: int

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.k_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.v_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


@dataclass(frozen=True)
class MambaSpec:
    """Nemotron-H's Mamba2 mixer (families.md §3.1): `num_heads` heads of `head_dim`, an SSM state of
    `state_size` per head, B and C shared by `n_groups` groups, a depthwise conv of width `conv_kernel`."""

    num_heads: int
    head_dim: int
    state_size: int
    n_groups: int
    conv_kernel: int
    conv_bias: bool = True
    proj_bias: bool = False

    @property
    def inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.inner + 2 * self.n_groups * self.state_size


@dataclass(frozen=True)
class SigmoidMoeSpec:
    """Nemotron-H's MoE (families.md §2.4): sigmoid router scores plus a correction bias used for the
    choice only; groups scored by their top-2 sum, `topk_group` groups kept, top-k experts within them;
    weights = the unbiased scores, renormalised if `norm_topk_prob`, times `routed_scaling_factor`. Experts
    and the shared expert are ReLU^2 MLPs (up, down)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    shared_intermediate_size: int
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0


# Layer mixers (the first sub-block of a layer) and MLPs (the second); NONE: the layer has no such block
# (Nemotron-H layers hold one block each).
ATTENTION, GDN, MAMBA, NONE = "attention", "gdn", "mamba", "none"
SWIGLU, RELU2, SOFTMAX_MOE, SIGMOID_MOE = "swiglu", "relu2", "moe", "sigmoid_moe"


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeSpec
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    has_qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int = -1
    hidden_act: str = "silu"
    moe: MoeSpec | None = None  # sparse MoE MLPs (qwen3_moe); None: every MLP is dense
    # Hybrids: each layer's token mixer (ATTENTION, GDN, MAMBA or NONE); empty means attention everywhere.
    layer_mixers: tuple[str, ...] = ()
    # Each layer's MLP (SWIGLU, RELU2, SIGMOID_MOE or NONE); empty means SwiGLU, or Qwen3-MoE's plan.
    layer_mlps: tuple[str, ...] = ()
    gdn: GdnSpec | None = None
    mamba: MambaSpec | None = None
    sigmoid_moe: SigmoidMoeSpec | None = None
    attn_output_gate: bool = False  # Qwen3.5: q_proj also yields a per-head gate, output * sigmoid(gate)
    norm_plus_one: bool = False  # Qwen3.5: RMSNorm weights stored as w, applied as (1 + w)
    norm_fp32_product: bool = False  # Qwen3.5, Nemotron-H: the weight multiplies in fp32, one rounding after
    use_rope: bool = True  # Nemotron-H attention is NoPE
    # Qwen3-VL: `deepstack_embeds_i` inputs added to the residual after decoder layers 0..N-1.
    num_deepstack_features: int = 0
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def mixer(self, i: int) -> str:
        return self.layer_mixers[i] if self.layer_mixers else ATTENTION

    def mlp(self, i: int) -> str:
        if self.layer_mlps:
            return self.layer_mlps[i]
        return SOFTMAX_MOE if self.is_moe_layer(i) else SWIGLU

    @property
    def attention_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.mixer(i) == ATTENTION]

    @property
    def recurrent_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.mixer(i) in (GDN, MAMBA)]

    @property
    def is_hybrid(self) -> bool:
        return bool(self.recurrent_layers)

    def is_moe_layer(self, i: int) -> bool:
        """Qwen3-MoE's layer plan (families.md §2.1): layer i's MLP is sparse iff it is not in
        `mlp_only_layers` and (i + 1) is a multiple of `decoder_sparse_step`."""
        m = self.moe
        return m is not None and i not in m.mlp_only_layers and (i + 1) % m.decoder_sparse_step == 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim


# Upper bounds far above any real model: values beyond them are corrupt or
# hostile, and are refused before anything is sized from them.
LIMITS = {
    "num_hidden_layers": 1024,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1024,
    "vocab_size": 1 << 23,
    "max_position_embeddings": 1 << 24,
    "sliding_window": 1 << 24,
}


def _int(cfg: dict, key: str, path: Path, default: int | None = None) -> int:
    v = cfg.get(key)
    if v is None:  # absent or null: HF writes null for "use the default"
        v = default
    if v is None:
        raise ExportError(f"config.json lacks the required field {key!r}", path)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ExportError(f"config.json field {key!r} must be a positive integer, got {v!r}", path)
    limit = LIMITS.get(key)
    if limit is not None and v > limit:
        raise ExportError(f"config.json field {key!r} = {v} is beyond any real model (limit {limit}); "
                          "the file is corrupt or crafted", path)
    return v


def _float(cfg: dict, key: str, path: Path, default: float) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ExportError(f"config.json field {key!r} must be a number, got {v!r}", path)
    return float(v)


# The runtime's multimodal token ids (families.md §7): the LLM's config.json carries them (the engine runner
# reads image_token_id / audio_token_id), taken from a Qwen-Omni style thinker_config, else the root.
MULTIMODAL_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                         "audio_token_id", "audio_start_token_id", "audio_end_token_id")


_LLM_SUBCONFIGS = ("llm_config", "text_config", "language_config")


def _llm_subconfig(raw: dict) -> dict | None:
    """The wrapped language model's config (families.md §1.2): none when the root is one itself; else the
    first of llm_config (InternVL3), text_config (Qwen VLs, InternVL3.5), language_config that has the
    decoder's sizes, else the same under thinker_config (Qwen3-Omni / ASR)."""
    if "num_attention_heads" in raw:
        return None
    for scope in (raw, raw.get("thinker_config")):
        for key in _LLM_SUBCONFIGS:
            inner = scope.get(key) if isinstance(scope, dict) else None
            if isinstance(inner, dict) and "hidden_size" in inner and "num_attention_heads" in inner:
                return inner
    return None


def text_config_of(raw: dict) -> dict:
    """The text decoder's config: VLM wrappers keep it in a sub-config (flat hub configs, e.g. the Qwen2.5-VL
    releases, have it at the root), with what the runtime config needs from the wrapper: its vision_config
    (VLM runners read it from the LLM's config, families.md §0.3) and multimodal token ids."""
    inner = _llm_subconfig(raw)
    if inner is not None:
        merged = dict(inner)
        merged.setdefault("model_type", raw.get("model_type"))
        if "vision_config" in raw:
            merged.setdefault("vision_config", raw["vision_config"])
        if merged.get("tie_word_embeddings") is None and "tie_word_embeddings" in raw:
            merged["tie_word_embeddings"] = raw["tie_word_embeddings"]
    else:
        merged = dict(raw)
    vision = _vision_config_of(raw)
    if vision is not None and inner is not None:  # Qwen3-Omni: the tower's config sits in thinker_config
        merged.setdefault("vision_config", vision)
    for scope in (raw.get("thinker_config"), raw):
        for key in MULTIMODAL_TOKEN_KEYS:
            if isinstance(scope, dict) and isinstance(scope.get(key), int) and merged.get(key) is None:
                merged[key] = scope[key]
    return merged


def _vision_config_of(raw: dict) -> dict | None:
    """The vision tower's config: at the root (VLMs), else in a Qwen-Omni style thinker_config."""
    for scope in (raw, raw.get("thinker_config")):
        vision = scope.get("vision_config") if isinstance(scope, dict) else None
        if isinstance(vision, dict):
            return vision
    return None


def parse_rope(cfg: dict, path: Path) -> tuple[RopeSpec, float]:
    """RopeSpec and partial_rotary_factor from either config dialect."""
    scaling = cfg.get("rope_parameters")
    if scaling is None:
        scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ExportError(f"rope_scaling / rope_parameters must be an object, got {scaling!r}", path)
    scaling = dict(scaling or {})
    theta = cfg.get("rope_theta", scaling.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ExportError(f"rope_theta must be a positive number, got {theta!r}", path)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if "mrope_section" in scaling and rope_type in ("default", "mrope"):
        # MRoPE (Qwen VLs): the 0.7.1 runtime knows it as "default" + mrope_section, never the string
        # "mrope" (families.md §1.3); an "mrope" it does not know would silently run as plain RoPE.
        rope_type = "default"
    scaling.pop("rope_theta", None)
    prf = cfg.get("partial_rotary_factor", scaling.pop("partial_rotary_factor", 1.0))
    if not isinstance(prf, (int, float)) or not 0 < prf <= 1:
        raise ExportError(f"partial_rotary_factor must be in (0, 1], got {prf!r}", path)
    return RopeSpec(str(rope_type), float(theta), scaling), float(prf)


def _check_mrope(rope: RopeSpec, rotary_dim: int, path: Path) -> None:
    """mrope_section: three non-negative frequency counts (temporal, height, width) covering the rotary
    dim's rotate-half pairs, as the runtime's MRoPE table and the HF model split them."""
    section = rope.params.get("mrope_section")
    if section is None:
        return
    if (not isinstance(section, list) or len(section) != 3
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in section)):
        raise ExportError(f"rope mrope_section must be three non-negative integers, got {section!r}", path)
    if 2 * sum(section) != rotary_dim:
        raise ExportError(f"rope mrope_section {section} covers {2 * sum(section)} rotary channels, but the "
                          f"rotary dim is {rotary_dim}; the config contradicts itself", path)


def build_model_config(raw: dict, tensor_names_have, path: Path) -> ModelConfig:
    """Normalise config.json. `tensor_names_have(suffix)` tells if a layer tensor exists."""
    cfg = text_config_of(raw)
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ExportError("config.json has no 'model_type'", path)
    hidden = _int(cfg, "hidden_size", path)
    heads = _int(cfg, "num_attention_heads", path)
    kv_heads = _int(cfg, "num_key_value_heads", path, heads)
    head_dim = _int(cfg, "head_dim", path, hidden // heads)
    if heads % kv_heads:
        raise ExportError(
            f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})",
            path,
        )
    rope, prf = parse_rope(cfg, path)
    if model_type in QWEN3_OMNI_TEXT_TYPES:
        rope = qwen3_omni_rope(rope)
    _check_mrope(rope, int(head_dim * prf), path)
    # HF Mistral applies `sliding_window` whenever it is set; Qwen2 only with
    # `use_sliding_window`. Other families: only when explicitly enabled.
    window = -1
    use_window = cfg.get("use_sliding_window", model_type == "mistral")
    if use_window and cfg.get("sliding_window"):
        window = _int(cfg, "sliding_window", path)
    tie = cfg.get("tie_word_embeddings", raw.get("tie_word_embeddings", False))
    if model_type == "nemotron_h":
        if cfg.get("num_hidden_layers") is None:  # recent transformers derive it from the layer plan
            plan = cfg.get("layers_block_type", cfg.get("hybrid_override_pattern"))
            if isinstance(plan, (list, str)) and plan:
                cfg = {**cfg, "num_hidden_layers": len(plan)}
        return replace(_base_config(cfg, raw, model_type, hidden, heads, kv_heads, head_dim, rope, prf, window, tie,
                                    tensor_names_have, path), **_nemotron_h_fields(cfg, path))
    return _base_config(cfg, raw, model_type, hidden, heads, kv_heads, head_dim, rope, prf, window, tie,
                        tensor_names_have, path)


def _base_config(cfg, raw, model_type, hidden, heads, kv_heads, head_dim, rope, prf, window, tie, tensor_names_have,
                 path) -> ModelConfig:
    return ModelConfig(
        model_type=model_type,
        vocab_size=_int(cfg, "vocab_size", path),
        hidden_size=hidden,
        intermediate_size=_int(cfg, "intermediate_size", path),
        num_hidden_layers=_int(cfg, "num_hidden_layers", path),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float(cfg, "rms_norm_eps", path, 1e-6),
        max_position_embeddings=_int(cfg, "max_position_embeddings", path, 4096),
        rope=rope,
        partial_rotary_factor=prf,
        tie_word_embeddings=bool(tie),
        has_qk_norm=tensor_names_have(".self_attn.q_norm.weight"),
        qkv_bias=tensor_names_have(".self_attn.q_proj.bias")
        or tensor_names_have(".self_attn.qkv_proj.bias"),
        o_bias=tensor_names_have(".self_attn.o_proj.bias"),
        mlp_bias=tensor_names_have(".mlp.down_proj.bias"),
        sliding_window=window,
        hidden_act=str(cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))),
        moe=_moe_spec(cfg, path) if model_type in QWEN3_MOE_TYPES else None,
        # Qwen3.5's VLM adds no deepstack features to its language model (0.7.1's Qwen3.5 class forces none)
        num_deepstack_features=0 if model_type in QWEN3_5_TYPES else _deepstack_count(cfg, raw, path),
        raw=cfg,
        **(_qwen3_5_fields(cfg, path) if model_type in QWEN3_5_TYPES else {}),
    )


# Qwen3-MoE decoders: Qwen3-MoE itself and Qwen3-Omni's thinker (the same layer, a softmax top-k router with
# no shared expert, the same layer plan; its rope is MRoPE and it takes deepstack features).
QWEN3_OMNI_TEXT_TYPES = ("qwen3_omni_moe_text",)
QWEN3_MOE_TYPES = ("qwen3_moe", *QWEN3_OMNI_TEXT_TYPES)
QWEN3_OMNI_MROPE_SECTION = [24, 20, 20]  # transformers' default when the thinker's rope names none


def qwen3_omni_rope(rope: RopeSpec) -> RopeSpec:
    """Qwen3-Omni's thinker always rotates with interleaved MRoPE (transformers' rotary embedding cycles t, h, w
    whatever the config's flags say, and takes mrope_section [24, 20, 20] when it names none): say so in the
    terms the runtime reads, `mrope_section` and `mrope_interleaved`."""
    if rope.rope_type != "default":
        return rope
    params = dict(rope.params)
    params.setdefault("mrope_section", list(QWEN3_OMNI_MROPE_SECTION))
    params["mrope_interleaved"] = True
    return replace(rope, params=params)


def _deepstack_count(cfg: dict, raw: dict, path: Path) -> int:
    """How many deepstack inputs the language model takes (families.md §1.3): `num_deepstack_features` of the
    language model's config, else of the root; else one per `vision_config.deepstack_visual_indexes`; else 3
    for a Qwen3-VL / Qwen3-Omni text model (their towers' default); else none."""
    for scope in (cfg, raw):
        n = scope.get("num_deepstack_features")
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int):
                raise ExportError(f"config.json field 'num_deepstack_features' must be an integer, got {n!r}", path)
            break
    else:
        vision = _vision_config_of(raw) or {}
        indexes = vision.get("deepstack_visual_indexes")
        types = f"{cfg.get('model_type')} {raw.get('model_type')}"
        n = len(indexes) if isinstance(indexes, list) else 3 if ("qwen3_vl" in types or "qwen3_omni" in types) else 0
    layers = _int(cfg, "num_hidden_layers", path)
    if not 0 <= n <= layers:
        raise ExportError(f"{n} deepstack features for a language model of {layers} layers: each is added after "
                          "one decoder layer", path)
    return n


QWEN3_5_TYPES = ("qwen3_5_text", "qwen3_5")
_QWEN3_5_LAYER_TYPES = {"linear_attention": GDN, "full_attention": ATTENTION}


def _qwen3_5_fields(cfg: dict, path: Path) -> dict:
    """Qwen3.5 text (families.md §3.2): the layer plan from `layer_types`, the GatedDeltaNet shape, gated
    attention, (1 + w) norms."""
    layers = _int(cfg, "num_hidden_layers", path)
    types = cfg.get("layer_types")
    if types is None:  # what transformers derives when config.json omits it
        interval = _int(cfg, "full_attention_interval", path, 4)
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers:
        raise ExportError(f"layer_types must list one entry per layer ({layers}), found "
                          f"{types if not isinstance(types, list) else f'{len(types)} entries'}", path)
    unknown = sorted({str(t) for t in types} - set(_QWEN3_5_LAYER_TYPES))
    if unknown:
        raise ExportError(f"layer_types holds {', '.join(map(repr, unknown))}; a Qwen3.5 layer is "
                          f"'linear_attention' (GatedDeltaNet) or 'full_attention'", path)
    gdn = GdnSpec(
        num_k_heads=_int(cfg, "linear_num_key_heads", path), num_v_heads=_int(cfg, "linear_num_value_heads", path),
        k_head_dim=_int(cfg, "linear_key_head_dim", path), v_head_dim=_int(cfg, "linear_value_head_dim", path),
        conv_kernel=_int(cfg, "linear_conv_kernel_dim", path))
    if gdn.num_v_heads % gdn.num_k_heads:
        raise ExportError(f"linear_num_value_heads ({gdn.num_v_heads}) is not a multiple of "
                          f"linear_num_key_heads ({gdn.num_k_heads})", path)
    return {"layer_mixers": tuple(_QWEN3_5_LAYER_TYPES[t] for t in types), "gdn": gdn,
            "attn_output_gate": True, "norm_plus_one": True, "norm_fp32_product": True}


def _moe_spec(cfg: dict, path: Path) -> MoeSpec | None:
    key = "num_experts" if cfg.get("num_experts") is not None else "num_local_experts"  # newer transformers
    if not cfg.get(key):
        return None
    experts = _int(cfg, key, path)
    top_k = _int(cfg, "num_experts_per_tok", path)
    if top_k > experts:
        raise ExportError(f"num_experts_per_tok ({top_k}) exceeds num_experts ({experts})", path)
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise ExportError(f"mlp_only_layers must be a list of layer indices, found {only!r}", path)
    norm = cfg.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        raise ExportError(f"norm_topk_prob must be true or false, found {norm!r}", path)
    return MoeSpec(num_experts=experts, top_k=top_k, intermediate_size=_int(cfg, "moe_intermediate_size", path),
                   decoder_sparse_step=_int(cfg, "decoder_sparse_step", path, 1),
                   mlp_only_layers=tuple(only), norm_topk_prob=norm)


# Nemotron-H's layer plan in both spellings (families.md §3.1): `hybrid_override_pattern` letters, and
# `layers_block_type` names (recent transformers: linear_attention / full_attention mean Mamba2 and
# attention here, never GatedDeltaNet). Each layer holds one block: (mixer, MLP).
_NEMOTRON_BLOCKS = {
    "M": (MAMBA, NONE), "*": (ATTENTION, NONE), "-": (NONE, RELU2), "E": (NONE, SIGMOID_MOE),
    "mamba": (MAMBA, NONE), "linear_attention": (MAMBA, NONE), "attention": (ATTENTION, NONE),
    "full_attention": (ATTENTION, NONE), "mlp": (NONE, RELU2), "moe": (NONE, SIGMOID_MOE),
}


def _nemotron_layer_plan(cfg: dict, layers: int, path: Path) -> list[tuple[str, str]]:
    pattern, names = cfg.get("hybrid_override_pattern"), cfg.get("layers_block_type")
    plans = []
    if pattern is not None:
        if not isinstance(pattern, str):
            raise ExportError(f"hybrid_override_pattern must be a string of M, *, - and E, found {pattern!r}", path)
        plans.append(("hybrid_override_pattern", list(pattern)))
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
            raise ExportError(f"layers_block_type must be a list of block names, found {names!r}", path)
        plans.append(("layers_block_type", names))
    if not plans:
        raise ExportError("config.json has neither hybrid_override_pattern nor layers_block_type; a Nemotron-H "
                          "layer plan is needed", path)
    decoded = []
    for key, plan in plans:
        unknown = sorted({x for x in plan if x not in _NEMOTRON_BLOCKS})
        if unknown:
            raise ExportError(f"{key} holds {', '.join(map(repr, unknown))}; known blocks are M (mamba), * "
                              "(attention), - (mlp) and E (moe), or their names", path)
        if len(plan) != layers:
            raise ExportError(f"{key} describes {len(plan)} layers but num_hidden_layers is {layers}", path)
        decoded.append([_NEMOTRON_BLOCKS[x] for x in plan])
    if len(decoded) == 2 and decoded[0] != decoded[1]:
        raise ExportError("hybrid_override_pattern and layers_block_type describe different layer plans", path)
    return decoded[0]


def _is_infinite(v) -> bool:
    if isinstance(v, dict):  # transformers writes float("inf") as {"__float__": "Infinity"}
        v = v.get("__float__")
    try:
        return float(v) == float("inf")
    except (TypeError, ValueError):
        return False


def _nemotron_h_fields(cfg: dict, path: Path) -> dict:
    """Nemotron-H (families.md §3.1, §2.4): the layer plan, the Mamba2 and MoE shapes, NoPE attention,
    ReLU^2 MLPs, norms whose weight multiplies in fp32."""
    layers = _int(cfg, "num_hidden_layers", path)
    plan = _nemotron_layer_plan(cfg, layers, path)
    for key, want in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
        if cfg.get(key, want) != want:
            raise ExportError(f"{key} is {cfg.get(key)!r}; Nemotron-H as the runtime runs it uses {want!r}", path)
    limit = cfg.get("time_step_limit")
    if limit is not None and not (isinstance(limit, list) and len(limit) == 2 and limit[0] in (0, 0.0)
                                  and _is_infinite(limit[1])):
        raise ExportError(f"time_step_limit {limit!r}: Edge-LLM 0.7's update_ssm_state only runs without a "
                          "time-step clamp, (0, inf)", path)
    mamba = MambaSpec(
        num_heads=_int(cfg, "mamba_num_heads", path), head_dim=_int(cfg, "mamba_head_dim", path),
        state_size=_int(cfg, "ssm_state_size", path), n_groups=_int(cfg, "n_groups", path),
        conv_kernel=_int(cfg, "conv_kernel", path), conv_bias=bool(cfg.get("use_conv_bias", True)),
        proj_bias=bool(cfg.get("mamba_proj_bias", False)))
    if mamba.num_heads % mamba.n_groups:
        raise ExportError(f"mamba_num_heads ({mamba.num_heads}) is not a multiple of n_groups ({mamba.n_groups})",
                          path)
    moe = None
    if any(mlp == SIGMOID_MOE for _, mlp in plan):
        if cfg.get("moe_latent_size") is not None:
            raise ExportError("moe_latent_size is set: latent-projected experts are not in the 0.7 runtime", path)
        if cfg.get("n_shared_experts", 1) != 1:
            raise ExportError(f"n_shared_experts {cfg.get('n_shared_experts')!r}: one shared expert is supported",
                              path)
        experts = _int(cfg, "n_routed_experts", path)
        top_k = _int(cfg, "num_experts_per_tok", path)
        n_group, topk_group = _int(cfg, "n_group", path, 1), _int(cfg, "topk_group", path, 1)
        if top_k > experts or experts % n_group or topk_group > n_group:
            raise ExportError(f"MoE routing is inconsistent: {experts} experts, top {top_k}, {n_group} groups, "
                              f"{topk_group} kept", path)
        moe = SigmoidMoeSpec(
            num_experts=experts, top_k=top_k, intermediate_size=_int(cfg, "moe_intermediate_size", path),
            shared_intermediate_size=_int(cfg, "moe_shared_expert_intermediate_size", path),
            n_group=n_group, topk_group=topk_group, norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            routed_scaling_factor=_float(cfg, "routed_scaling_factor", path, 1.0))
    return {"layer_mixers": tuple(mx for mx, _ in plan), "layer_mlps": tuple(mlp for _, mlp in plan),
            "mamba": mamba, "sigmoid_moe": moe, "use_rope": False, "norm_fp32_product": True,
            "rms_norm_eps": _float(cfg, "layer_norm_epsilon", path, 1e-5),
            "qkv_bias": bool(cfg.get("attention_bias", False)), "o_bias": bool(cfg.get("attention_bias", False)),
            "mlp_bias": bool(cfg.get("mlp_bias", False)), "has_qk_norm": False, "sliding_window": -1,
            "hidden_act": "silu"}


# Components a multimodal checkpoint carries besides its language model, by the config keys that announce
# them (the root config, or a Qwen-Omni style `thinker_config`).
COMPONENT_KEYS = {"visual": ("vision_config", "embd_layer.image_embd_layer"),  # the latter: original Phi-4-MM
                  "audio": ("audio_config", "embd_layer.audio_embd_layer"),
                  # speech output (Qwen3-Omni, families.md §5.6): never exported by this version, never dropped
                  # silently; --components without them says so knowingly
                  "talker": ("talker_config",), "code2wav": ("code2wav_config",)}
COMPONENTS = ("llm", "visual", "audio")
_COMPONENT_NAMES = {"visual": "visual encoder", "audio": "audio encoder", "talker": "talker (speech output)",
                    "code2wav": "code2wav vocoder"}


def exported_components(raw: dict) -> tuple[str, ...]:
    """What this version can write for the checkpoint: the language model, and its vision tower where the
    tower's family is implemented (visual.FAMILIES)."""
    from . import audio, visual

    return ("llm", *(["visual"] if visual.exportable(raw) else []), *(["audio"] if audio.exportable(raw) else []))


def multimodal_components(raw: dict) -> dict[str, str]:
    """component -> the config key that announces it, for every encoder the checkpoint carries."""
    found = {}
    for scope, where in ((raw, ""), (raw.get("thinker_config"), "thinker_config.")):
        if not isinstance(scope, dict):
            continue
        for comp, keys in COMPONENT_KEYS.items():
            for key in keys:
                if isinstance(_dotted(scope, key), dict) and comp not in found:
                    found[comp] = where + key
    return found


def _dotted(scope: dict, key: str):
    for part in key.split("."):
        scope = scope.get(part) if isinstance(scope, dict) else None
    return scope


def check_components(raw: dict, requested: tuple[str, ...] | None, path: Path) -> tuple[str, ...]:
    """The components to write. A multimodal checkpoint never loses a component silently: without
    `--components`, every component the checkpoint has is written, and an encoder this version cannot export
    is an error; `--components llm` exports the language model alone, knowingly."""
    from edgellm_core.errors import UnsupportedError

    unknown = [c for c in requested or () if c not in COMPONENTS]
    if unknown:
        raise ExportError(f"--components names {', '.join(map(repr, unknown))}; components are "
                          f"{', '.join(COMPONENTS)}", path)
    if requested is not None and "llm" not in requested:
        raise UnsupportedError("--components without llm: an export always holds the language model (the encoders' "
                               "outputs only mean something to it)", path)
    can = exported_components(raw)
    present = multimodal_components(raw)
    absent = [c for c in requested or () if c != "llm" and c not in present]
    if absent:
        raise ExportError(f"--components {','.join(absent)}: the checkpoint has no {' or '.join(absent)} encoder",
                          path)
    missing = [c for c in requested or () if c not in can]
    if missing:
        from . import audio, visual

        raise UnsupportedError(f"--components {','.join(missing)}: exporting the {' and '.join(missing)} encoder of "
                               f"a {raw.get('model_type')!r} checkpoint is not implemented yet (vision towers: "
                               f"{', '.join(sorted(visual.FAMILIES))}; audio encoders: "
                               f"{', '.join(sorted(audio.FAMILIES))})", path)
    if requested is not None:
        return tuple(c for c in COMPONENTS if c in requested)
    cannot = {c: key for c, key in present.items() if c not in can}
    if cannot:
        named = ", ".join(f"a {_COMPONENT_NAMES[c]} ({key})" for c, key in cannot.items())
        rest = ",".join(c for c in COMPONENTS if c in can and (c == "llm" or c in present))
        them = "them" if len(cannot) > 1 else "it"
        raise UnsupportedError(
            f"this checkpoint also has {named}, which edgellm-export cannot export yet; exporting without {them} "
            f"would drop {them} without a word. Pass --components {rest} to export the rest, knowingly", path)
    return ("llm", *(c for c in COMPONENTS if c in present))
