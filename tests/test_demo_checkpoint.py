import hashlib
import itertools
import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from edgellm_export.demo_checkpoint import _bf16_bits, write_demo_checkpoint

TEXT = "Hello world, this is a test."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return transformers.AutoTokenizer.from_pretrained(ckpt)


def _digests(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}


def test_byte_identical_across_runs(ckpt, tmp_path):
    again = write_demo_checkpoint(tmp_path / "again")
    assert again == tmp_path / "again"
    assert _digests(again) == _digests(ckpt)
    assert set(_digests(ckpt)) == {
        "config.json", "generation_config.json", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
    }


def test_seed_changes_weights_only(ckpt, tmp_path):
    other = _digests(write_demo_checkpoint(tmp_path, seed=1))
    base = _digests(ckpt)
    assert other["model.safetensors"] != base["model.safetensors"]
    assert other["tokenizer.json"] == base["tokenizer.json"]


def test_transformers_loads_and_runs(ckpt, tokenizer):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, output_loading_info=True
    )
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[key], key
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    top2 = logits[0, -1].topk(2).values
    assert top2[0] - top2[1] > 0.1  # top-1 is not a near-tie

    stored = load_file(ckpt / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    q = model.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(q, stored["model.layers.1.self_attn.q_proj.weight"].float())
    assert torch.equal(model.lm_head.weight, stored["lm_head.weight"].float())


def test_bf16_rounding_matches_torch():
    x = np.random.default_rng(3).standard_normal(10_000).astype(np.float32)
    x[:4] = [1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0, 3.0e38]  # exact ties and extremes
    ours = torch.from_numpy(_bf16_bits(x).view(np.int16))
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16)
    assert torch.equal(ours, ref)


def test_config_matches_tokenizer(ckpt, tokenizer):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["vocab_size"] == len(tokenizer)
    assert 300 <= cfg["vocab_size"] <= 320
    assert cfg["head_dim"] == 64 and cfg["model_type"] == "llama"
    assert cfg["bos_token_id"] == tokenizer.bos_token_id
    assert cfg["eos_token_id"] == tokenizer.eos_token_id


def test_tokenizer_round_trip_and_chat(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    assert len(ids) < len(TEXT)  # merges actually fire
    odd = "naïve 東京 \t\n x"  # multi-byte UTF-8 and whitespace runs
    assert tokenizer.decode(tokenizer.encode(odd)) == odd

    chat = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    sys_chat = [{"role": "system", "content": "Be brief."}, *chat]
    text = tokenizer.apply_chat_template(sys_chat, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "helpful" not in text and not text.endswith("assistant\n")
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def _rank_bpe(piece, vocab):
    """Merge by lowest vocab id, as Edge-LLM's C++ (tiktoken-style) encoder does."""
    parts, never = list(piece), 1 << 30
    while True:
        pairs = [(vocab.get(a + b, never), i)
                 for i, (a, b) in enumerate(itertools.pairwise(parts))]
        if not pairs or min(pairs)[0] == never:
            return [vocab[p] for p in parts]
        i = min(pairs)[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def test_rank_based_bpe_agrees_with_merges(ckpt, tokenizer):
    vocab = json.loads((ckpt / "tokenizer.json").read_text())["model"]["vocab"]
    backend = tokenizer.backend_tokenizer
    samples = (TEXT, "What are you testing for? The world and all of it, be on.")
    for text in (*samples, "Hellos Hello's"):
        pieces = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
        expected = [i for p in pieces for i in _rank_bpe(p, vocab)]
        assert tokenizer.encode(text) == expected
