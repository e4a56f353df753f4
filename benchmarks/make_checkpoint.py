"""Write a random-weight checkpoint with a real model's exact shapes, without holding it in memory.

Each tensor is generated in slices and appended to its shard, so memory stays
at one slice. Shapes: Llama-3.2-1B (2.47 GB bf16, tied embeddings, llama3 RoPE),
Llama-3.1-8B (16 GB bf16, sharded) and Qwen3-30B-A3B (128 experts of 768 per layer,
q/k norms; cut to a few layers with `--layers`: 1.2 GB of experts per layer).

    python -m benchmarks.make_checkpoint llama-3.2-1b /data/llama1b
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import numpy as np

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_scaling={**LLAMA3_ROPE}, rope_theta=500000.0, max_position_embeddings=131072),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         rope_scaling={**LLAMA3_ROPE, "factor": 8.0}, rope_theta=500000.0,
                         max_position_embeddings=131072),
}
SHAPES["qwen3-30b-a3b"] = dict(
    model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=2048, intermediate_size=6144,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
    tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=40960, num_experts=128,
    num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[],
    norm_topk_prob=True, rms_norm_eps=1e-6)
# Qwen2.5-VL-7B as the hub ships it (flat config, `model.layers.*`, `visual.*`), cut to 4 decoder layers and
# 4 vision blocks (one of them full-attention): the VLM benchmark shape.
SHAPES["qwen2.5-vl-7b-4l"] = dict(
    model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"], hidden_size=3584,
    intermediate_size=18944, num_hidden_layers=4, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
    vocab_size=152064, tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=128000,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rms_norm_eps=1e-6, attention_bias=True,
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    vision_config={"depth": 4, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
                   "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                   "window_size": 112, "fullatt_block_indexes": [3], "hidden_act": "silu", "model_type": "qwen2_5_vl"})
SHARD_BYTES = 5 * 2**30
SLICE_ELEMS = 16 * 2**20


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, inter, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    moe = c.get("model_type") == "qwen3_moe"
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, q)), (p + "post_attention_layernorm.weight", (h,))]
        if moe:  # per-expert tensors, as the hub ships them; q/k norms
            e_inter = c["moe_intermediate_size"]
            out += [(p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,)),
                    (p + "mlp.gate.weight", (c["num_experts"], h))]
            for e in range(c["num_experts"]):
                x = p + f"mlp.experts.{e}."
                out += [(x + "gate_proj.weight", (e_inter, h)), (x + "up_proj.weight", (e_inter, h)),
                        (x + "down_proj.weight", (h, e_inter))]
        else:
            out += [(p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                    (p + "mlp.down_proj.weight", (h, inter))]
        if c.get("attention_bias"):
            out += [(p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.bias", (kv,)),
                    (p + "self_attn.v_proj.bias", (kv,))]
    out.append(("model.norm.weight", (h,)))
    if not c["tie_word_embeddings"]:
        out.append(("lm_head.weight", (c["vocab_size"], h)))
    if c.get("model_type") == "qwen2_5_vl":
        out += vision_tensor_shapes(c["vision_config"])
    return out


def vision_tensor_shapes(v: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Qwen2.5-VL's tower, `visual.*` (q/k/v biases on the language model come from `attention_bias`)."""
    h, inter, m2 = v["hidden_size"], v["intermediate_size"], v["spatial_merge_size"] ** 2
    out = [("visual.patch_embed.proj.weight", (h, v["in_chans"], v["temporal_patch_size"], v["patch_size"],
                                               v["patch_size"]))]
    for i in range(v["depth"]):
        p = f"visual.blocks.{i}."
        out += [(p + "norm1.weight", (h,)), (p + "norm2.weight", (h,)), (p + "attn.qkv.weight", (3 * h, h)),
                (p + "attn.qkv.bias", (3 * h,)), (p + "attn.proj.weight", (h, h)), (p + "attn.proj.bias", (h,))]
        for name, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            out += [(p + f"mlp.{name}.weight", shape), (p + f"mlp.{name}.bias", (shape[0],))]
    out += [("visual.merger.ln_q.weight", (h,)), ("visual.merger.mlp.0.weight", (h * m2, h * m2)),
            ("visual.merger.mlp.0.bias", (h * m2,)), ("visual.merger.mlp.2.weight", (v["out_hidden_size"], h * m2)),
            ("visual.merger.mlp.2.bias", (v["out_hidden_size"],))]
    return out


def _bf16_slice(rng: np.random.Generator, n: int, norm: bool) -> bytes:
    x = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
    if norm:
        x = x + np.float32(1.0)
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # truncation is fine for random data


def write_checkpoint(name: str, out: Path, seed: int = 0, layers: int | None = None) -> Path:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
           "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
           **SHAPES[name]}
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for tname, shape in tensor_shapes(cfg):
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((tname, shape))
        size += nbytes
    rng = np.random.default_rng(seed)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for tname, shape in shard:
            n = int(np.prod(shape)) * 2
            header[tname] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[tname] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for tname, shape in shard:
                total = int(np.prod(shape))
                for start in range(0, total, SLICE_ELEMS):
                    f.write(_bf16_slice(rng, min(SLICE_ELEMS, total - start), tname.endswith("norm.weight")))
    _copy_demo_tokenizer(out)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(int(np.prod(s)) * 2 for _, s in tensor_shapes(cfg))},
                 "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def _copy_demo_tokenizer(out: Path) -> None:
    """Tokenizer and chat template from the built-in demo (exporters need one; the ids are not used)."""
    import shutil
    import tempfile

    from edgellm_export.demo_checkpoint import write_demo_checkpoint

    with tempfile.TemporaryDirectory() as d:
        demo = write_demo_checkpoint(Path(d) / "demo")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(demo / name, out / name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, help="override num_hidden_layers")
    args = p.parse_args()
    write_checkpoint(args.shape, args.out, layers=args.layers)
    print(args.out)


if __name__ == "__main__":
    main()
