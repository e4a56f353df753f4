"""A tiny, byte-for-byte reproducible Llama checkpoint used as the built-in demo.

Everything is derived from a seed and hand-written tables, so the files are
identical on every run and machine (no library versions or timestamps leak in).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

HIDDEN, INTERMEDIATE, LAYERS = 128, 256, 2
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64  # Edge-LLM attention needs head_dim 64 or 128

# Hand-picked merges, in priority order. Edge-LLM's C++ tokenizer ignores the
# merge list and merges by vocab rank (tiktoken style), so the list is chosen
# such that every merged token splits into two vocab tokens in exactly one way;
# then both algorithms produce the same ids (checked in _merges()).
_MERGES = (
    "Ġ t", "h e", "i n", "e r", "o n", "r e", "e n", "a t", "o r", "e s",
    "o u", "a l", "e d", "l l", "a r", "l e", "n d", "l d", "Ġ a", "Ġ s",
    "Ġ w", "Ġ c", "Ġ o", "Ġ b", "Ġ f", "Ġ p", "Ġ m", "Ġ i", "Ġ y", "H e",
    "Ġt he", "in g", "Ġt o", "Ġo f", "Ġi s", "Ġa nd", "Ġw or", "Ġwor ld",
    "He ll", "Hell o", "es t", "Ġt est", "Ġc on", "Ġb e", "Ġf or", "Ġa re",
    "Ġy ou", "Ġw h", "Ġwh at",
)
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>")
BOS, EOS, PAD = "<|begin_of_text|>", "<|im_end|>", "<|end_of_text|>"

# GPT-2 style split (contractions, letters, digits, punctuation, whitespace);
# Edge-LLM only honours pre-tokenizers of type Split/Regex, so spell it out.
_SPLIT_REGEX = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """Byte -> printable char: the byte-level BPE alphabet HF and Edge-LLM share."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # unprintable bytes are moved above 255, in byte order
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _merges() -> tuple[dict[str, int], list[str]]:
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    for merge in _MERGES:
        left, right = merge.split(" ")
        assert left in vocab and right in vocab and left + right not in vocab, merge
        vocab[left + right] = len(vocab)
    for token in list(vocab)[256:]:
        splits = [i for i in range(1, len(token))
                  if token[:i] in vocab and token[i:] in vocab]
        assert len(splits) == 1, f"{token!r} is ambiguous for rank-based BPE"
    return vocab, list(_MERGES)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round-to-nearest-even (inputs are finite)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).astype("<u2")


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    # safetensors.numpy cannot store bfloat16, so write the format directly:
    # u64 header size, JSON header (sorted names, space padded to 8), raw data.
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        size = tensors[name].nbytes
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in sorted(tensors):
            f.write(tensors[name].astype("<u2").tobytes())


def _weights(vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> np.ndarray:
        return _bf16_bits((mean + std * rng.standard_normal(shape)).astype(np.float32))

    # Large-std embedding/lm_head so the logits are spread and top-1 is stable.
    out = {"model.embed_tokens.weight": normal((vocab_size, HIDDEN), 0.5)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN),
            "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
            "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
            "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
            "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
            "mlp.up_proj": (INTERMEDIATE, HIDDEN),
            "mlp.down_proj": (HIDDEN, INTERMEDIATE),
        }
        for name, shape in shapes.items():
            out[f"{p}{name}.weight"] = normal(shape, 0.02)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{p}{norm}.weight"] = normal((HIDDEN,), 0.1, mean=1.0)
    out["model.norm.weight"] = normal((HIDDEN,), 0.1, mean=1.0)
    out["lm_head.weight"] = normal((vocab_size, HIDDEN), 0.5)
    return out


def _dump(path: Path, obj: object) -> None:
    text = json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    path.write_bytes(text.encode("utf-8"))


def write_demo_checkpoint(out_dir: Path, *, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = _merges()
    ids = {tok: len(vocab) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab_size = len(vocab) + len(SPECIAL_TOKENS)
    bos, eos, pad = ids[BOS], ids[EOS], ids[PAD]

    _dump(out_dir / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 512, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "vocab_size": vocab_size,
        "torch_dtype": "bfloat16", "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "bos_token_id": bos, "eos_token_id": eos,
        "pad_token_id": pad,
    })
    _dump(out_dir / "generation_config.json", {
        "bos_token_id": bos, "eos_token_id": [eos, ids["<|end_of_text|>"]],
        "pad_token_id": pad, "do_sample": False,
    })
    _write_safetensors(out_dir / "model.safetensors", _weights(vocab_size, seed))

    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}
             for tok, i in ids.items()]
    _dump(out_dir / "tokenizer.json", {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added, "normalizer": None, "post_processor": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _SPLIT_REGEX},
             "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False},
        ]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False,
                    "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    })
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    _dump(out_dir / "special_tokens_map.json", special)
    _dump(out_dir / "tokenizer_config.json", {
        **special, "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 512, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"}
                                 for a in added},
    })
    return out_dir
