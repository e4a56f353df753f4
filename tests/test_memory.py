"""Peak memory of an export does not grow with the number of layers.

Two checkpoints identical but for depth (2 vs 12 layers, ~8 MB of bf16 per
layer) are exported in fresh processes; the deeper one may not cost more than
a small constant on top. Holding the weights (or their mapped pages) would add
~70-150 MB.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
H, INTER, VOCAB, HEADS, KV = 512, 2048, 8192, 8, 2


def write_checkpoint(path: Path, layers: int) -> Path:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    cfg = dict(model_type="llama", hidden_size=H, intermediate_size=INTER, num_hidden_layers=layers,
               num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=VOCAB, rms_norm_eps=1e-5,
               max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False)
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    d = H // HEADS

    def rnd(*shape):
        return (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rnd(VOCAB, H), "lm_head.weight": rnd(VOCAB, H),
               "model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rnd(HEADS * d, H), p + "self_attn.k_proj.weight": rnd(KV * d, H),
            p + "self_attn.v_proj.weight": rnd(KV * d, H), p + "self_attn.o_proj.weight": rnd(H, HEADS * d),
            p + "mlp.gate_proj.weight": rnd(INTER, H), p + "mlp.up_proj.weight": rnd(INTER, H),
            p + "mlp.down_proj.weight": rnd(H, INTER),
        })
    save_file(tensors, str(path / "model.safetensors"))
    return path


PROBE = """
import resource, sys
from edgellm_export.export import export_checkpoint
export_checkpoint(sys.argv[1], sys.argv[2])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mb(ckpt: Path, out: Path) -> float:
    r = subprocess.run([sys.executable, "-c", PROBE, str(ckpt), str(out)], capture_output=True, text=True,
                       cwd=ROOT, timeout=600, check=True)
    return int(r.stdout.split()[-1]) / 1024.0


def test_peak_rss_flat_in_layer_count(tmp_path):
    shallow = write_checkpoint(tmp_path / "l2", 2)
    deep = write_checkpoint(tmp_path / "l12", 12)
    size_mb = [(d / "model.safetensors").stat().st_size / 2**20 for d in (shallow, deep)]
    layer_mb = size_mb[1] - size_mb[0]
    assert layer_mb > 70  # the deep one really is ~72 MB bigger
    rss = [peak_rss_mb(shallow, tmp_path / "o2"), peak_rss_mb(deep, tmp_path / "o12")]
    growth = rss[1] - rss[0]
    print(f"peak RSS 2 layers {rss[0]:.0f} MB, 12 layers {rss[1]:.0f} MB, checkpoint +{layer_mb:.0f} MB")
    assert growth < 0.25 * layer_mb, f"peak RSS grew {growth:.0f} MB for {layer_mb:.0f} MB more weights"
    assert np.isfinite(rss).all()
