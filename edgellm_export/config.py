"""ModelConfig: the normalised architecture, from config.json plus tensor names.

config.json comes in two dialects: legacy (`rope_scaling`, top-level
`rope_theta`) and transformers 5 (`rope_parameters` holding theta and type).
Feature flags that config.json does not state reliably (q/k norm, biases) are
inferred from which tensors exist, as the runtime's reference exporter does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


ATTENTION, GDN = "attention", "gdn"  # layer mixers


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
    # Hybrids: each layer's token mixer (ATTENTION or GDN); empty means attention everywhere.
    layer_mixers: tuple[str, ...] = ()
    gdn: GdnSpec | None = None
    attn_output_gate: bool = False  # Qwen3.5: q_proj also yields a per-head gate, output * sigmoid(gate)
    norm_plus_one: bool = False  # Qwen3.5: RMSNorm weights stored as w, applied as (1 + w)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def mixer(self, i: int) -> str:
        return self.layer_mixers[i] if self.layer_mixers else ATTENTION

    @property
    def attention_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.mixer(i) == ATTENTION]

    @property
    def recurrent_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.mixer(i) != ATTENTION]

    @property
    def is_hybrid(self) -> bool:
        return bool(self.recurrent_layers)

    def attention_ordinal(self, i: int) -> int:
        """Layer i's index among the attention layers: its KV cache binding's number."""
        return self.attention_layers.index(i)

    def recurrent_ordinal(self, i: int) -> int:
        """Layer i's index among the recurrent layers: its conv / recurrent state bindings' number."""
        return self.recurrent_layers.index(i)

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


def text_config_of(raw: dict) -> dict:
    """The text decoder's config: VLM wrappers keep it under `text_config`."""
    inner = raw.get("text_config")
    if isinstance(inner, dict) and "hidden_size" in inner and "hidden_size" not in raw:
        merged = dict(inner)
        merged.setdefault("model_type", raw.get("model_type"))
        return merged
    return raw


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
    scaling.pop("rope_theta", None)
    prf = cfg.get("partial_rotary_factor", scaling.pop("partial_rotary_factor", 1.0))
    if not isinstance(prf, (int, float)) or not 0 < prf <= 1:
        raise ExportError(f"partial_rotary_factor must be in (0, 1], got {prf!r}", path)
    return RopeSpec(str(rope_type), float(theta), scaling), float(prf)


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
    # HF Mistral applies `sliding_window` whenever it is set; Qwen2 only with
    # `use_sliding_window`. Other families: only when explicitly enabled.
    window = -1
    use_window = cfg.get("use_sliding_window", model_type == "mistral")
    if use_window and cfg.get("sliding_window"):
        window = _int(cfg, "sliding_window", path)
    tie = cfg.get("tie_word_embeddings", raw.get("tie_word_embeddings", False))
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
        moe=_moe_spec(cfg, path) if model_type == "qwen3_moe" else None,
        raw=cfg,
        **(_qwen3_5_fields(cfg, path) if model_type in QWEN3_5_TYPES else {}),
    )


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
            "attn_output_gate": True, "norm_plus_one": True}


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
