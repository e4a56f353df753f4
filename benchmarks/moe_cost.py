"""Cost of the standard-ops MoE (models/blocks/moe.py) against the dense SwiGLU it replaces, on onnxruntime.

The plugin-free MoE runs every expert on every token (exact for any routing, no data-dependent shapes),
so its arithmetic is E/k times that of the k routed experts and grows with tokens x experts. This times
one MoE layer (Qwen3-30B-A3B-like widths scaled down: H=1024, I=384 per expert, top-8) against a dense
SwiGLU of the same active width (k x I), for a few expert counts and token counts, on one CPU thread.

    python -m benchmarks.moe_cost
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _graph(moe: bool, experts: int, top_k: int, hidden: int, inter: int):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgellm_core.onnx_graph.builder import FLOAT16, GraphBuilder
    from edgellm_export.config import ModelConfig, MoeSpec, RopeSpec
    from edgellm_export.models.blocks import mlp
    from edgellm_export.models.blocks import moe as moe_block
    from edgellm_export.quant.plan import QuantDecisions

    g = GraphBuilder("moe_cost")
    cfg = ModelConfig(model_type="qwen3_moe", vocab_size=8, hidden_size=hidden, intermediate_size=top_k * inter,
                      num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8, head_dim=hidden // 8,
                      rms_norm_eps=1e-6, max_position_embeddings=64, rope=RopeSpec("default", 1e4),
                      moe=MoeSpec(experts, top_k, inter, norm_topk_prob=True) if moe else None)

    class Weights:
        def linear_weight(self, name, out_f, in_f):
            return g.weight(name, FLOAT16, (in_f, out_f), None)

        def stacked_linear_weights(self, name, parts, out_f, in_f):
            return g.weight(name, FLOAT16, (len(parts), in_f, out_f), None)

    class Emitter:
        pass

    e = Emitter()
    e.g, e.w, e.cfg, e.quant = g, Weights(), cfg, QuantDecisions()
    x = g.input("x", FLOAT16, ["batch", "seq", hidden])
    y = moe_block.emit(e, 0, x) if moe else mlp.emit(e, 0, x)
    g.output(y, "y", FLOAT16, ["batch", "seq", hidden])
    rng = np.random.default_rng(0)
    inits = list(g.initializers) + [numpy_helper.from_array((rng.standard_normal(w.shape) * 0.02).astype(np.float16),
                                                            w.name) for w in g.weights]
    graph = helper.make_graph(g.nodes, "moe_cost", g.inputs, g.outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    model.ir_version = 10
    del TensorProto, onnx
    return model.SerializeToString()


def main() -> None:
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128])
    p.add_argument("--top-k", type=int, default=8)
    args = p.parse_args()
    hidden, inter = 1024, 384
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    rows = ["| experts | tokens | MoE ms | dense (k x I) ms | MoE / dense |", "|---|---|---|---|---|"]
    dense = ort.InferenceSession(_graph(False, 0, args.top_k, hidden, inter), so, providers=["CPUExecutionProvider"])
    for experts in args.experts:
        sess = ort.InferenceSession(_graph(True, experts, args.top_k, hidden, inter), so,
                                    providers=["CPUExecutionProvider"])
        for tokens in args.tokens:
            x = (np.random.default_rng(1).standard_normal((1, tokens, hidden)) * 0.5).astype(np.float16)

            def timed(s, x=x):
                s.run(None, {"x": x})
                t0 = time.perf_counter()
                for _ in range(3):
                    s.run(None, {"x": x})
                return (time.perf_counter() - t0) / 3 * 1e3

            a, b = timed(sess), timed(dense)
            rows.append(f"| {experts} | {tokens} | {a:.1f} | {b:.1f} | {a / b:.1f} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
