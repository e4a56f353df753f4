"""The pre-norm decoder (Llama, Mistral, Qwen2, Qwen3, Phi-3, Qwen3-MoE, Qwen3.5): a stack of blocks.

Each layer is RMSNorm -> token mixer -> residual, RMSNorm -> MLP -> residual. The config's layer plan
picks each layer's blocks: the mixer is GQA attention (AttentionPlugin) or, in hybrids, a GatedDeltaNet
(`ModelConfig.mixer`); the MLP is SwiGLU or a sparse MoE (`ModelConfig.is_moe_layer`). The blocks
(models/blocks/) hold both faces, and this module stacks them twice: `emit_graph` (the ONNX graph,
built from the config with no weights loaded) and `DecoderLayer` / `DecoderHead` (eager torch, for the
golden reference). Optional parts follow the config: q/k RMSNorm (Qwen3), q/k/v, o and MLP biases,
gated attention and (1 + w) norms (Qwen3.5).
"""

from __future__ import annotations

import functools

from edgellm_core.onnx_graph.builder import FLOAT, GraphBuilder

from ..config import ATTENTION, GDN, MAMBA, NONE, SIGMOID_MOE, SOFTMAX_MOE, ModelConfig
from ..quant.plan import QuantDecisions
from .blocks import attention, gdn, linear, mamba, mlp, moe, norms, sigmoid_moe
from .weights import WeightSource


def linear_names(cfg: ModelConfig, has_lm_head: bool) -> list[str]:
    """Every linear layer, by canonical module name (what quantization metadata refers to)."""
    names = []
    for i in range(cfg.num_hidden_layers):
        names += {ATTENTION: [f"layers.{i}.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")],
                  GDN: gdn.linear_names(i), MAMBA: mamba.linear_names(i), NONE: []}[cfg.mixer(i)]
        kind = cfg.mlp(i)
        if kind == SOFTMAX_MOE:
            names += [moe.router_name(i), *moe.expert_linears(cfg, i)]
        elif kind == SIGMOID_MOE:
            names += [sigmoid_moe.router_name(i), *sigmoid_moe.expert_linears(cfg, i)]
        elif kind != NONE:
            names += [f"layers.{i}.mlp.{m}" for m in mlp.projections(kind)]
    return names + (["lm_head"] if has_lm_head and not cfg.tie_word_embeddings else [])


def split_fused_tensors(ckpt, cfg: ModelConfig) -> None:
    """Expose fused `qkv_proj` / `gate_up_proj` (Phi-3 and others) as their parts' names."""
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        for kind in ("weight", "bias"):
            ckpt.split_fused(p + f"self_attn.qkv_proj.{kind}", [
                (p + f"self_attn.q_proj.{kind}", cfg.q_dim),
                (p + f"self_attn.k_proj.{kind}", cfg.kv_dim),
                (p + f"self_attn.v_proj.{kind}", cfg.kv_dim),
            ])
            ckpt.split_fused(p + f"mlp.gate_up_proj.{kind}", [
                (p + f"mlp.gate_proj.{kind}", cfg.intermediate_size),
                (p + f"mlp.up_proj.{kind}", cfg.intermediate_size),
            ])


def lm_head_name(cfg: ModelConfig, has_lm_head: bool) -> str:
    # HF ties lm_head to the embedding whenever tie_word_embeddings is set.
    return "embed_tokens.weight" if cfg.tie_word_embeddings or not has_lm_head else "lm_head.weight"


# -- ONNX graph -----------------------------------------------------------------------------
class _Emitter:
    """What every block's graph face needs: the builder, the weight source, the config, the quant plan."""

    def __init__(self, g: GraphBuilder, w: WeightSource, cfg: ModelConfig, quant: QuantDecisions):
        self.g, self.w, self.cfg, self.quant = g, w, cfg, quant


def emit_graph(g: GraphBuilder, w: WeightSource, cfg: ModelConfig, contract, has_lm_head: bool,
               quant: QuantDecisions | None = None) -> None:
    """Pre-norm layers (RMSNorm -> mixer -> residual, RMSNorm -> MLP -> residual; a layer without a
    mixer or an MLP skips that half), then the head."""
    quant = quant or QuantDecisions()
    e, n, c = _Emitter(g, w, cfg, quant), g.node, cfg
    io = contract.declare_io(g, cfg, kv_fp8=quant.kv_scales is not None)
    h = c.hidden_size

    def norm(x, name):
        return norms.emit(g, x, norms.weight_name(w, name, h, c.norm_plus_one), c.rms_norm_eps,
                          c.norm_fp32_product)

    x = io.inputs_embeds
    for i in range(c.num_hidden_layers):
        g.scope = f"layers.{i}"
        p = f"layers.{i}."
        first = True
        if c.mixer(i) != NONE:
            y = norm(x, p + "input_layernorm.weight")
            x = n("Add", [x, _emit_mixer(e, io, contract, i, y)])
            first = False
        if c.mlp(i) != NONE:
            y = norm(x, p + ("input_layernorm.weight" if first else "post_attention_layernorm.weight"))
            x = n("Add", [x, _emit_mlp(e, i, y)])
        if i < len(io.deepstack):  # Qwen3-VL: the tower's features at image positions (zeros elsewhere)
            x = n("Add", [x, io.deepstack[i]])
    g.scope = "head"
    y = norm(x, "norm.weight")
    # Logits only for the selected token of each sequence: GatherND(batch_dims=1).
    idx = n("Unsqueeze", [io.last_token_ids, g.i64(-1)])
    sel = n("GatherND", [y, idx], {"batch_dims": 1})
    if lm_head_name(c, has_lm_head) == "lm_head.weight":
        logits = linear.emit(e, sel, "lm_head", c.vocab_size, h, False)
    else:
        logits = n("MatMul", [sel, w.linear_weight("embed_tokens.weight", c.vocab_size, h)])
    logits = n("Cast", [logits], {"to": FLOAT})
    g.scope = ""
    contract.finish_outputs(g, io, c, logits)


def _emit_mixer(e, io, contract, i: int, y: str) -> str:
    kind = e.cfg.mixer(i)
    if kind == ATTENTION:
        kv_scales = e.quant.kv_scales[i] if e.quant.kv_scales is not None else None
        return attention.emit(e, io, contract, i, y, kv_scales)
    return {GDN: gdn, MAMBA: mamba}[kind].emit(e, io, contract, i, y)


def _emit_mlp(e, i: int, y: str) -> str:
    kind = e.cfg.mlp(i)
    if kind == SOFTMAX_MOE:
        return moe.emit(e, i, y)
    if kind == SIGMOID_MOE:
        return sigmoid_moe.emit(e, i, y)
    return mlp.emit(e, i, y, kind)


# -- eager torch reference -------------------------------------------------------------------
def stream_stacks(kind: str) -> tuple[str, ...]:
    """The expert stacks (`layers.{i}.mlp.experts.{proj}.stacked`) a MoE MLP's eager `Stream` takes, in the
    order the graph declares (and the weight writer streams) them; () for a dense MLP."""
    if kind == SOFTMAX_MOE:
        return moe.PROJECTIONS
    if kind == SIGMOID_MOE:
        return sigmoid_moe.PROJECTIONS
    return ()


@functools.cache
def torch_modules():
    """(DecoderLayer, DecoderHead) eager classes, defined once; imports torch on first use."""
    import torch
    from torch import nn

    from edgellm_core.ops.attention_plugin import register_torch_op

    attention_plugin = register_torch_op()
    r16 = linear.r16

    class DecoderLayer(nn.Module):
        """One decoder layer computed in fp32 and stored in fp16 where the graph stores, over the
        graph's initializers of that layer (`layers.{i}.self_attn.q_proj.weight.T`, ...)."""

        def __init__(self, cfg: ModelConfig, tensors: dict, quant: QuantDecisions | None = None, layer: int = 0,
                     native: bool = False):
            """`native`: attention in the plugin-free form (`--attention native`), with (K, V) caches."""
            super().__init__()
            self.cfg, self.native = cfg, native
            self.t = {k.split(".", 2)[2]: v for k, v in tensors.items()}
            quant = quant or QuantDecisions()
            prefix = f"layers.{layer}."
            self.quant = {k[len(prefix):]: v for k, v in quant.linears.items() if k.startswith(prefix)}
            self.kv_scales = quant.kv_scales[layer] if quant.kv_scales is not None else None
            self.mixer, self.mlp = cfg.mixer(layer), cfg.mlp(layer)

        def initial_state(self, batch: int, bindings, capacity: int):
            """This layer's carried state for a fresh batch, zeroed as the runtime's buffers are."""
            c = self.cfg
            if self.mixer == ATTENTION and self.native:
                return attention.native_initial_state(c, batch, bindings, capacity)
            if self.mixer == ATTENTION:
                return torch.zeros(bindings.kv_cache_dims(batch, c.num_key_value_heads, capacity, c.head_dim),
                                   dtype=torch.float16)
            if self.mixer == NONE:
                return None
            return {GDN: gdn, MAMBA: mamba}[self.mixer].initial_state(c, batch, bindings)

        def forward_steps(self, xs, caches, rope_table, calls):
            """Many runtime calls at once: `calls` lists (cache index, context_lengths, start index)
            per hidden state in `xs`, in execution order. Position-wise work (norms,
            projections, MLP) runs on all tokens together, so each weight is widened
            to fp32 once; only the mixers walk the calls in order, updating `caches`.
            """
            sizes = [x.shape[1] for x in xs]
            x = self.mix(torch.cat(xs, dim=1), sizes, caches, rope_table, calls)
            if self.mlp != NONE:
                stream = self.mlp_stream(x)
                if stream is None:
                    out = self.mlp_eager(self.mlp_input(x), sizes)
                else:
                    for name in stream_stacks(self.mlp):
                        stream.take(name, self.t[f"mlp.experts.{name}.stacked"])
                    out = stream.result(self.t, self.quant)
                x = r16(x + out)
            return list(x.split(sizes, 1)), caches

        def _norm(self, x, name):
            c = self.cfg
            return norms.eager(x, self.t[norms.weight_key(name, c.norm_plus_one)], c.rms_norm_eps,
                               c.norm_fp32_product)

        def mix(self, x, sizes, caches, rope_table, calls):
            """The first half of the layer: x plus the mixer's output (x itself without a mixer)."""
            c, t = self.cfg, self.t
            if self.mixer == NONE:
                return x
            y = self._norm(x, "input_layernorm.weight")
            if self.mixer == ATTENTION:
                mixed = attention.eager(y, sizes, t, self.quant, c, self.kv_scales, caches, rope_table, calls,
                                        attention_plugin, native=self.native)
            else:
                mixed = {GDN: gdn, MAMBA: mamba}[self.mixer].eager(y, sizes, t, self.quant, c, caches, calls)
            return r16(x + mixed)

        def mlp_input(self, x):
            return self._norm(x, "post_attention_layernorm.weight" if self.mixer != NONE else
                              "input_layernorm.weight")

        def mlp_stream(self, x):
            """For a MoE MLP with fp16 expert stacks, its eager face ready to take the stacks one at a time;
            else None (a dense MLP, or experts in a quantized plugin's packed layout)."""
            if any(k.startswith("mlp.experts.") and q.format != "fp16" for k, q in self.quant.items()):
                return None
            if self.mlp == SOFTMAX_MOE:
                return moe.Stream(self.mlp_input(x), self.t, self.cfg, self.quant)
            if self.mlp == SIGMOID_MOE:
                return sigmoid_moe.Stream(self.mlp_input(x), self.t, self.cfg, self.quant)
            return None

        def mlp_eager(self, y, sizes=None):
            if self.mlp == SOFTMAX_MOE:  # packed quantized experts, held whole (moe.eager: Int4MoePlugin)
                return moe.eager(y, self.t, self.cfg, self.quant)
            if self.mlp == SIGMOID_MOE:  # NVFP4 experts: Nvfp4MoePlugin's path depends on each call's B*S
                return torch.cat([sigmoid_moe.eager(p, self.t, self.cfg, self.quant)
                                  for p in y.split(sizes or [y.shape[1]], 1)], 1)
            return mlp.eager(y, self.t, self.quant, self.mlp)

    class DecoderHead(nn.Module):
        """Final norm, token selection and lm_head (its own tensors, any format, or the tied embedding)."""

        def __init__(self, cfg: ModelConfig, tensors: dict, quant: QuantDecisions | None = None):
            super().__init__()
            self.cfg, self.norm = cfg, tensors[norms.weight_key("norm.weight", cfg.norm_plus_one)]
            self.t = {("lm_head" + k[len("embed_tokens"):] if k.startswith("embed_tokens.") else k): v
                      for k, v in tensors.items()}
            self.quant = (quant or QuantDecisions()).linears

        def forward_steps(self, xs, last_token_ids):
            """Logits `[B, 1, V]` per call; the vocab is widened in slices, once for all calls."""
            sel = torch.cat([torch.gather(x, 1, ids[:, :, None].expand(-1, -1, x.shape[-1]))
                             for x, ids in zip(xs, last_token_ids)], dim=1)
            y = norms.eager(sel, self.norm, self.cfg.rms_norm_eps, self.cfg.norm_fp32_product)
            return list(linear.eager(y, self.t, "lm_head", self.quant).split(1, dim=1))

    return DecoderLayer, DecoderHead
