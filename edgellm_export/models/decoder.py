"""The default dense decoder (Llama, Mistral, Qwen2, Qwen3, Phi-3 style).

RMSNorm, GQA attention through the runtime's AttentionPlugin, SwiGLU MLP.
Optional parts follow the checkpoint's tensors: q/k RMSNorm (Qwen3), q/k/v,
o and MLP biases. Two faces of the same structure live side by side here:
`DecoderLayer` / `DecoderHead` (eager torch, for the golden reference) and
`emit_graph` (the ONNX graph, built from the config with no weights loaded).
"""

from __future__ import annotations

import functools

import numpy as np

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, GraphBuilder

from ..config import ModelConfig
from ..quant import linear as qlinear
from ..quant.plan import FP16, QuantDecisions
from .weights import WeightSource


def linear_names(cfg: ModelConfig, has_lm_head: bool) -> list[str]:
    """Every linear layer, by canonical module name (what quantization metadata refers to)."""
    names = [f"layers.{i}.{m}" for i in range(cfg.num_hidden_layers)
             for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
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
    def __init__(self, g: GraphBuilder, w: WeightSource, cfg: ModelConfig, quant: QuantDecisions):
        self.g, self.w, self.cfg, self.quant = g, w, cfg, quant

    def rms_norm(self, x: str, weight: str, eps: float) -> str:
        # fp32 statistics, cast back to fp16, then the fp16 weight (as HF Llama does).
        n, g = self.g.node, self.g
        xf = n("Cast", [x], {"to": FLOAT})
        var = n("ReduceMean", [n("Pow", [xf, g.const(np.array(2.0, np.float32))]), g.i64(-1)])
        inv = n("Reciprocal", [n("Sqrt", [n("Add", [var, g.const(np.array(eps, np.float32))])])])
        normed = n("Cast", [n("Mul", [xf, inv])], {"to": FLOAT16})
        return n("Mul", [normed, weight])

    def linear(self, x: str, name: str, out_f: int, in_f: int, bias: bool) -> str:
        lq = self.quant.linears.get(name)
        if lq is not None and lq.format != FP16:
            y = qlinear.emit(qlinear.LinearContext(self.g, self.w, name, out_f, in_f, lq), x)
        else:
            y = self.g.node("MatMul", [x, self.w.linear_weight(f"{name}.weight", out_f, in_f)])
        if bias:
            y = self.g.node("Add", [y, self.w.vector(f"{name}.bias", out_f)])
        return y

    def head_norm(self, x: str, name: str, heads: int) -> str:
        d = self.cfg.head_dim
        x4 = self.g.node("Reshape", [x, self.g.i64(0, 0, heads, d)])
        y = self.rms_norm(x4, self.w.vector(name, d), self.cfg.rms_norm_eps)
        return self.g.node("Reshape", [y, self.g.i64(0, 0, heads * d)])


def emit_graph(g: GraphBuilder, w: WeightSource, cfg: ModelConfig, contract, has_lm_head: bool,
               quant: QuantDecisions | None = None) -> None:
    quant = quant or QuantDecisions()
    e, n, c = _Emitter(g, w, cfg, quant), g.node, cfg
    io = contract.declare_io(g, cfg, kv_fp8=quant.kv_scales is not None)
    h = c.hidden_size
    x = io.inputs_embeds
    for i in range(c.num_hidden_layers):
        g.scope = f"layers.{i}"
        p = f"layers.{i}."
        y = e.rms_norm(x, w.vector(p + "input_layernorm.weight", h), c.rms_norm_eps)
        q = e.linear(y, p + "self_attn.q_proj", c.q_dim, h, c.qkv_bias)
        k = e.linear(y, p + "self_attn.k_proj", c.kv_dim, h, c.qkv_bias)
        v = e.linear(y, p + "self_attn.v_proj", c.kv_dim, h, c.qkv_bias)
        if c.has_qk_norm:
            q = e.head_norm(q, p + "self_attn.q_norm.weight", c.num_attention_heads)
            k = e.head_norm(k, p + "self_attn.k_norm.weight", c.num_key_value_heads)
        attn = contract.attention(g, io, c, i, q, k, v,
                                  kv_scales=quant.kv_scales[i] if quant.kv_scales is not None else None)
        attn = n("Reshape", [attn, g.i64(0, 0, c.q_dim)])
        x = n("Add", [x, e.linear(attn, p + "self_attn.o_proj", h, c.q_dim, c.o_bias)])
        y = e.rms_norm(x, w.vector(p + "post_attention_layernorm.weight", h), c.rms_norm_eps)
        gate = e.linear(y, p + "mlp.gate_proj", c.intermediate_size, h, c.mlp_bias)
        up = e.linear(y, p + "mlp.up_proj", c.intermediate_size, h, c.mlp_bias)
        act = n("Mul", [n("Mul", [gate, n("Sigmoid", [gate])]), up])  # SiLU(gate) * up
        x = n("Add", [x, e.linear(act, p + "mlp.down_proj", h, c.intermediate_size, c.mlp_bias)])
    g.scope = "head"
    y = e.rms_norm(x, w.vector("norm.weight", h), c.rms_norm_eps)
    # Logits only for the selected token of each sequence: GatherND(batch_dims=1).
    idx = n("Unsqueeze", [io.last_token_ids, g.i64(-1)])
    sel = n("GatherND", [y, idx], {"batch_dims": 1})
    if lm_head_name(c, has_lm_head) == "lm_head.weight":
        logits = e.linear(sel, "lm_head", c.vocab_size, h, False)
    else:
        logits = n("MatMul", [sel, w.linear_weight("embed_tokens.weight", c.vocab_size, h)])
    logits = n("Cast", [logits], {"to": FLOAT})
    g.scope = ""
    contract.finish_outputs(g, io, c, logits)


# -- eager torch reference -------------------------------------------------------------------
@functools.cache
def torch_modules():
    """(DecoderLayer, DecoderHead) eager classes, defined once; imports torch on first use."""
    import torch
    from torch import nn

    from edgellm_core.ops.attention_plugin import register_torch_op

    attention_plugin = register_torch_op()

    def r16(x):
        """Round to fp16 where the graph stores an fp16 activation. Computing in fp32 but storing
        where the runtime stores keeps the reference's quantizer inputs bit-identical to the
        engine's in almost every element, so activation quantization (a step of up to a third
        of the value in NVFP4) rarely rounds one way here and the other way there."""
        return x.half().float()

    def linear(x, t, name, quant):
        """fp32 x through the linear `name`, in its checkpoint's format, over initializers `t`."""
        lq = quant.get(name)
        if lq is not None and lq.format != FP16:
            y = r16(qlinear.eager(x, t, name, lq))
        else:
            y = r16(matmul_fp16(x, t[name + ".weight.T"]))
        b = t.get(name + ".bias")
        return r16(y + b.float()) if b is not None else y

    def matmul_fp16(x, w):
        """x (fp32, [..., K]) @ w (fp16, [K, N]) in fp32, widening w in cache-sized blocks.

        Widening a whole weight to fp32 first costs a full extra pass through
        memory; blocks of 64 rows by 8192 columns stay in cache (about 2x faster).
        """
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        n = w.shape[1]
        y = x2.new_zeros((x2.shape[0], n))
        for n0 in range(0, n, 8192):
            cols = w[:, n0 : n0 + 8192]
            out = y[:, n0 : n0 + 8192]
            for k0 in range(0, k, 64):
                out.addmm_(x2[:, k0 : k0 + 64], cols[k0 : k0 + 64].float())
        return y.reshape(*lead, n)

    def rms_norm(x, weight, eps):
        xf = x.float()
        return r16(r16(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)) * weight.float())

    class DecoderLayer(nn.Module):
        """One decoder layer computed in fp32 and stored in fp16 where the graph stores, over the
        graph's initializers of that layer.

        `tensors` maps initializer names (`layers.{i}.self_attn.q_proj.weight.T`,
        `[in, out]` fp16) to tensors; they are widened to fp32 block by block as used.
        """

        def __init__(self, cfg: ModelConfig, tensors: dict, quant: QuantDecisions | None = None, layer: int = 0):
            super().__init__()
            self.cfg = cfg
            self.t = {k.split(".", 2)[2]: v for k, v in tensors.items()}
            quant = quant or QuantDecisions()
            prefix = f"layers.{layer}."
            self.quant = {k[len(prefix):]: v for k, v in quant.linears.items() if k.startswith(prefix)}
            self.kv_scales = quant.kv_scales[layer] if quant.kv_scales is not None else None

        def _linear(self, x, name):
            return linear(x, self.t, name, self.quant)

        def forward_steps(self, xs, caches, rope_table, calls):
            """Many runtime calls at once: `calls` lists (cache index, context_lengths, start index)
            per hidden state in `xs`, in execution order. Position-wise work (norms,
            projections, MLP) runs on all tokens together, so each weight is widened
            to fp32 once; only attention walks the calls in order, updating `caches`.
            """
            c, t = self.cfg, self.t
            sizes = [x.shape[1] for x in xs]
            x = torch.cat(xs, dim=1)
            b = x.shape[0]
            y = rms_norm(x, t["input_layernorm.weight"], c.rms_norm_eps)
            q = self._linear(y, "self_attn.q_proj")
            k = self._linear(y, "self_attn.k_proj")
            v = self._linear(y, "self_attn.v_proj")
            if c.has_qk_norm:
                q = rms_norm(q.view(b, -1, c.num_attention_heads, c.head_dim), t["self_attn.q_norm.weight"],
                             c.rms_norm_eps).reshape(b, -1, c.q_dim)
                k = rms_norm(k.view(b, -1, c.num_key_value_heads, c.head_dim), t["self_attn.k_norm.weight"],
                             c.rms_norm_eps).reshape(b, -1, c.kv_dim)
            attn = []
            for qs, ks, vs, (cache, ctx, start) in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1),
                                                        calls):
                out, caches[cache] = attention_plugin(
                    qs, ks, vs, caches[cache], ctx, rope_table, start,
                    c.num_attention_heads, c.num_key_value_heads, c.head_dim, 0, int(self.kv_scales is not None),
                    -1, [1.0, *(self.kv_scales or (1.0, 1.0))],
                )
                attn.append(r16(out.reshape(b, out.shape[1], -1)))
            x = r16(x + self._linear(torch.cat(attn, dim=1), "self_attn.o_proj"))
            y = rms_norm(x, t["post_attention_layernorm.weight"], c.rms_norm_eps)
            gate = self._linear(y, "mlp.gate_proj")
            act = r16(r16(gate * r16(torch.sigmoid(gate))) * self._linear(y, "mlp.up_proj"))  # SiLU(gate) * up
            x = r16(x + self._linear(act, "mlp.down_proj"))
            return list(x.split(sizes, 1)), caches

    class DecoderHead(nn.Module):
        """Final norm, token selection and lm_head (its own tensors, any format, or the tied embedding)."""

        def __init__(self, cfg: ModelConfig, tensors: dict, quant: QuantDecisions | None = None):
            super().__init__()
            self.cfg, self.norm = cfg, tensors["norm.weight"]
            self.t = {("lm_head" + k[len("embed_tokens"):] if k.startswith("embed_tokens.") else k): v
                      for k, v in tensors.items()}
            self.quant = (quant or QuantDecisions()).linears

        def forward_steps(self, xs, last_token_ids):
            """Logits `[B, 1, V]` per call; the vocab is widened in slices, once for all calls."""
            sel = torch.cat([torch.gather(x, 1, ids[:, :, None].expand(-1, -1, x.shape[-1]))
                             for x, ids in zip(xs, last_token_ids)], dim=1)
            y = rms_norm(sel, self.norm, self.cfg.rms_norm_eps)
            return list(linear(y, self.t, "lm_head", self.quant).split(1, dim=1))

    return DecoderLayer, DecoderHead
