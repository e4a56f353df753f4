"""The smoke check's last step on a TensorRT target: build a one-layer engine and run it.

What the plugin-registry check cannot show: that this image's TensorRT, plugin library and GPU build an
engine from an Edge-LLM graph with both of llm_build's profiles, and run a prefill and a decode step
through the AttentionPlugin with the KV cache bound in place. The graph is made here from edgellm_core
alone (no torch, no checkpoint, a few hundred KB): the 0.7 bindings, one attention layer with random
fp16 weights (head_dim 64, two query heads over one KV head), the token selection and an lm_head. The
engine's logits are compared with the CPU twin's on the same graph (onnxruntime over the ops' lowerings)
when onnxruntime is there, else only checked to be finite.

`native=True` makes the plugin-free form of the same layer instead (trt_native_ops: RotaryEmbedding,
TensorScatter and Attention, separate K and V caches of 0.7.1's static capacity), for images without the
plugin library: what it shows is that this TensorRT parses and builds those ops and the engine runs them
with the caches bound in place.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgellm_core.bindings import bindings_for
from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, INT32, INT64, GraphBuilder
from edgellm_core.ops import attention_plugin, native_attention
from edgellm_core.ops.schemas import ONNX_OPSET

RELEASE = "0.7.1"
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, CAPACITY = 128, 2, 1, 64, 64, 64
PROMPT = [3, 14, 15, 9, 26, 5, 35]
DECODE = [8, 9]
MIN_COSINE = 0.999
NATIVE_CAPACITY = 4096  # the static K/V capacity of 0.7.1's plugin-free graphs (contract native.md)


def write_one_layer_export(llm: Path, seed: int = 0, *, native: bool = False) -> Path:
    """`llm/` with model.onnx (weights inline), config.json and embedding.safetensors; `native`: the
    plugin-free graph (the same weights for the same seed)."""
    b = bindings_for(RELEASE)
    rng = np.random.default_rng(seed)
    g = GraphBuilder("edgellm_smoke")
    q_dim, kv_dim = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM

    def weight(rows, cols, name):
        return g.const((rng.standard_normal((rows, cols)) * 0.05).astype(np.float16), name)

    x = g.input(b.inputs_embeds, FLOAT16, ["batch", "seq_len", HIDDEN])
    if native:  # NVIDIA's native input order (the runtime binds by name; profiles.py keeps the same order)
        rope = g.input(b.rope_cos_sin, FLOAT, ["rope_batch", "max_pos", HEAD_DIM])
        ctx = g.input(b.context_lengths, INT32, ["batch"])
        last = g.input(b.last_token_ids, INT64, ["batch", 1])
        cache_dims = list(b.native_kv_cache_dims("batch", KV_HEADS, NATIVE_CAPACITY, HEAD_DIM))
        k_cache, v_cache = (g.input(name, FLOAT16, cache_dims) for name in b.native_kv(0))
        start = g.input(b.kvcache_start_index, INT32, ["kv_batch"])
    else:
        past = g.input(b.past(0), FLOAT16, list(b.kv_cache_dims("batch", KV_HEADS, "past_len", HEAD_DIM)))
        rope = g.input(b.rope_cos_sin, FLOAT, ["rope_batch", "max_pos", HEAD_DIM])
        ctx = g.input(b.context_lengths, INT32, ["batch"])
        start = g.input(b.kvcache_start_index, INT32, ["kv_batch"])
        last = g.input(b.last_token_ids, INT64, ["batch", 1])
    n = g.node
    q, k, v = (n("MatMul", [x, weight(HIDDEN, d, f"w_{p}")]) for p, d in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)))
    if native:
        shared = native_attention.native_shared(g, x, rope, ctx, start, HEAD_DIM)
        attn, present_k, present_v = native_attention.native_core(g, shared, q, k, v, k_cache, v_cache, HEADS,
                                                                  KV_HEADS, HEAD_DIM, HEAD_DIM)
    else:
        attn, present = attention_plugin.emit(g, [q, k, v, past, ctx, rope, start], num_q_heads=HEADS,
                                              num_kv_heads=KV_HEADS, head_size=HEAD_DIM)
    y = n("Add", [x, n("MatMul", [n("Reshape", [attn, g.i64(0, 0, q_dim)]), weight(q_dim, HIDDEN, "w_o")])])
    sel = n("GatherND", [y, n("Unsqueeze", [last, g.i64(-1)])], {"batch_dims": 1})
    logits = n("Cast", [n("MatMul", [sel, weight(HIDDEN, VOCAB, "w_lm")])], {"to": FLOAT})
    g.output(logits, b.logits, FLOAT, ["batch", 1, VOCAB])
    if native:
        for value, name in zip((present_k, present_v), b.native_present_kv(0)):
            g.output(value, name, FLOAT16, cache_dims)
        opsets = {"": ONNX_OPSET}
    else:
        g.output(present, b.present(0), FLOAT16, list(b.kv_cache_dims("batch", KV_HEADS, "present_len", HEAD_DIM)))
        opsets = {"": ONNX_OPSET, attention_plugin.DOMAIN: 1}
    model = g.to_model("unused.data", opsets, 10, producer=("edgellm-validate smoke", RELEASE))
    llm.mkdir(parents=True, exist_ok=True)
    (llm / "model.onnx").write_bytes(model.SerializeToString())
    config = {"model": "llama", "model_type": "llm", "edgellm_version": RELEASE, "trt_native_ops": native,
              "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": HIDDEN, "num_hidden_layers": 1,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
              "max_position_embeddings": 4 * CAPACITY, "rope_theta": 10000.0,
              "rope_scaling": {"type": "default", "rope_type": "default"}, "partial_rotary_factor": 1.0,
              "num_deepstack_features": 0}
    (llm / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_embedding(llm / "embedding.safetensors", (rng.standard_normal((VOCAB, HIDDEN)) * 0.5).astype(np.float16))
    return llm


def _write_embedding(path: Path, table: np.ndarray) -> None:
    raw = json.dumps({"embedding": {"dtype": "F16", "shape": list(table.shape),
                                    "data_offsets": [0, table.nbytes]}}).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + table.tobytes())


def scenario() -> list[dict]:
    """One sequence: a plain prefill (context profile), then decode steps (generation profile)."""
    steps = [{"phase": "prefill", "token_ids": [PROMPT], "context_lengths": [len(PROMPT)], "kvcache_start_index": [],
              "last_token_ids": [[len(PROMPT) - 1]]}]
    for i, tok in enumerate(DECODE):
        done = len(PROMPT) + i
        steps.append({"phase": "decode", "token_ids": [[tok]], "context_lengths": [done + 1],
                      "kvcache_start_index": [done], "last_token_ids": [[0]]})
    return [{"name": "smoke", "steps": steps}]


def run_engine_check(work: Path, *, plugin_path: str | None, device, trt, native: bool = False) -> dict:
    """Build the one-layer engine under `work` and run the scenario; returns a report with `problems`.
    `native`: the plugin-free graph, built without a plugin library."""
    from .trt.backend import TrtBackend
    from .twin import drive

    llm = write_one_layer_export(Path(work) / "llm", native=native)
    capacity = NATIVE_CAPACITY if native else CAPACITY
    meta = {"kv_capacity": capacity, "scenarios": scenario()}
    report: dict = {"steps": len(meta["scenarios"][0]["steps"]), "form": "plugin-free" if native else "plugin"}
    problems: list[str] = []
    backend = TrtBackend(llm, meta, plugin_path=plugin_path, device=device, trt=trt,
                         engine_dir=Path(work) / "engine")
    try:
        engine = [logits for _, _, _, logits in drive(llm, backend, meta["scenarios"], capacity)]
        report["build"] = backend.details.get("build")
    finally:
        backend.close()
    if not all(np.isfinite(x).all() for x in engine):
        problems.append("the one-layer engine produced non-finite logits")
    try:
        from .cpu_backend import CpuBackend
    except ImportError:
        report["compared_with_cpu"] = False
        return {**report, "problems": problems}
    cpu = CpuBackend(llm)
    try:
        twin = [logits for _, _, _, logits in drive(llm, cpu, meta["scenarios"], capacity)]
    finally:
        cpu.close()
    cosines = [float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)) for a, b in zip(engine, twin)]
    same_top1 = [int(a.argmax()) == int(b.argmax()) for a, b in zip(engine, twin)]
    report.update(compared_with_cpu=True, cosines=cosines, top1_agree=same_top1)
    for i, (cos, top) in enumerate(zip(cosines, same_top1)):
        if cos < MIN_COSINE or not top:
            phase = meta["scenarios"][0]["steps"][i]["phase"]
            problems.append(f"the one-layer engine disagrees with the CPU twin at step {i} ({phase}): cosine "
                            f"{cos:.6f} (needs {MIN_COSINE}), top-1 {'agrees' if top else 'differs'}")
    return {**report, "problems": problems}
