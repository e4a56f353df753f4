"""`edgellm run`: an export generates on the CPU twin what HF transformers generates from the checkpoint.

Greedy: token for token, 32 new tokens, against `model.generate(do_sample=False)` on the same checkpoint
(the demo Llama, and a tiny Qwen3 with the demo tokenizer). The tiny random models can have near-tied
logits, so each case also asserts that HF's top-1/top-2 margin at every step is well above the fp16 noise
measured between the twin's logits and HF's on the same path: the equality then means something.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from edgellm_export.cli import main
from edgellm_export.demo_checkpoint import write_demo_checkpoint
from edgellm_export.export import export_checkpoint
from edgellm_validate import generate as G

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
NEW_TOKENS = 32
# Cases picked for a clear top-1 at each of the 32 steps (measured HF margins: llama >= 0.09,
# qwen3 >= 2.5; twin-vs-HF noise on the path <= 0.02).
CASES = {"llama": "Hello", "qwen3": "Hello world, this is a test."}
MIN_MARGIN = 0.05
MAX_NOISE = 0.03


@pytest.fixture(scope="module")
def exports(tmp_path_factory, hf_checkpoints):
    """family -> (checkpoint dir, export OUT, fp32 HF model, HF tokenizer)."""
    root = tmp_path_factory.mktemp("run")
    demo = write_demo_checkpoint(root / "llama-ckpt")
    llama = transformers.AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
    # A tiny random Qwen3 (tied embeddings, q/k norm) over the demo tokenizer's vocabulary.
    qwen_ckpt, qwen = hf_checkpoints("qwen3-run", "qwen3", vocab_size=309)
    for name in TOKENIZER_FILES:
        shutil.copyfile(demo / name, qwen_ckpt / name)
    out = {}
    for fam, ckpt, model in (("llama", demo, llama), ("qwen3", qwen_ckpt, qwen)):
        export_checkpoint(ckpt, root / f"{fam}-out")
        out[fam] = (ckpt, root / f"{fam}-out", model.eval(), transformers.AutoTokenizer.from_pretrained(ckpt))
    return out


class Recording(G.Sampler):
    """Greedy, keeping the logits it was given."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __call__(self, logits):
        self.rows.append(np.array(logits, np.float32))
        return super().__call__(logits)


def hf_greedy(model, ids, eos_ids, n=NEW_TOKENS):
    """HF's greedy continuation, stopping at the same ids as the export (which carries no generation config)."""
    with torch.no_grad():
        r = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, eos_token_id=eos_ids,
                           pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return r.sequences[0, len(ids):].tolist(), torch.stack(r.logits)[:, 0].float().numpy()


@pytest.mark.parametrize("family", sorted(CASES))
def test_greedy_equals_transformers(exports, family):
    _, out, model, tok = exports[family]
    gen = G.Generator(out)
    ids = gen.encode(CASES[family])
    assert ids == tok(CASES[family])["input_ids"]  # same prompt ids as HF's tokenizer
    want, hf_logits = hf_greedy(model, ids, gen.eos_ids)
    assert len(want) == NEW_TOKENS and not set(want) & set(gen.eos_ids)  # no stop inside the 32 tokens

    sampler = Recording()
    got = list(gen.generate(ids, max_new_tokens=NEW_TOKENS, sampler=sampler))
    gen.close()
    assert got == want

    top2 = np.sort(hf_logits, -1)[:, -2:]
    margin = float((top2[:, 1] - top2[:, 0]).min())
    noise = float(np.abs(np.stack(sampler.rows) - hf_logits).max())
    assert noise < MAX_NOISE, f"twin logits off HF's by {noise}"
    assert margin >= MIN_MARGIN and margin > 2 * noise, f"near-tie: margin {margin}, noise {noise}"


def test_cli_streams_transformers_text(exports):
    """Through the real command: stdout is HF's greedy continuation, decoded; stats on stderr."""
    _, out, model, tok = exports["llama"]
    want, _ = hf_greedy(model, tok(CASES["llama"])["input_ids"], [tok.eos_token_id])
    r = subprocess.run([sys.executable, "-m", "edgellm_export", "run", str(out), "--prompt", CASES["llama"],
                        "--max-new-tokens", str(NEW_TOKENS)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == tok.decode(want) + "\n"
    assert "[stopped: --max-new-tokens (32); greedy]" in r.stderr
    assert "prompt: 1 tokens in" in r.stderr and "decode: 31 tokens in" in r.stderr and "tokens/s" in r.stderr


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_chat_prompt_ids_equal_apply_chat_template(exports, system):
    _, out, model, tok = exports["llama"]
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": "What are you testing for?"}]
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    gen = G.Generator(out)
    got = gen.encode("What are you testing for?", chat=True, system=system)
    assert got == list(want)
    # ...and the chat continuation is HF's too, as far as HF goes before its own stop ids.
    hf, _ = hf_greedy(model, got, gen.eos_ids, n=8)
    ours = list(gen.generate(got, max_new_tokens=8, sampler=G.Sampler()))
    gen.close()
    assert ours == [t for t in hf if t not in gen.eos_ids]  # HF keeps the stop token, we do not print it


def test_seeded_sampling_reproducible(exports):
    _, out, _, _ = exports["qwen3"]
    gen = G.Generator(out)
    ids = gen.encode("Hello")

    def sample(seed):
        return list(gen.generate(ids, max_new_tokens=24, sampler=G.Sampler(1.5, 0.95, seed)))

    a, b, c = sample(7), sample(7), sample(8)
    greedy = list(gen.generate(ids, max_new_tokens=24, sampler=G.Sampler()))
    gen.close()
    assert a == b and len(a) == 24
    assert a != c and a != greedy  # the seed and the temperature matter


def test_sampler_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert {G.Sampler(1.0, 0.5, s)(logits) for s in range(50)} == {0}  # 0.5 alone reaches top_p
    assert {G.Sampler(1.0, 0.75, s)(logits) for s in range(200)} == {0, 1}
    assert {G.Sampler(1.0, 1.0, s)(logits) for s in range(400)} == {0, 1, 2, 3}
    assert G.Sampler()(logits) == 0
    s1, s2 = G.Sampler(0.7, 0.9, 3), G.Sampler(0.7, 0.9, 3)
    assert [s1(logits) for _ in range(30)] == [s2(logits) for _ in range(30)]


def test_stream_decoder_multibyte(exports):
    tok = G.load_tokenizer(exports["llama"][1] / "llm")
    text = "naïve 東京 ok, ÿ€😀 end"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split())  # multi-byte characters span several byte tokens
    dec = G.StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces.count("") >= 2  # a character's first bytes were held back until complete


def _main(capsys, *args):
    code = main(["run", *map(str, args)])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_stops_at_eos_from_generation_config(exports, tmp_path, capsys):
    _, out, _, _ = exports["llama"]
    copy = shutil.copytree(out, tmp_path / "out")
    gen = G.Generator(copy)
    greedy = list(gen.generate(gen.encode("Hello"), max_new_tokens=8, sampler=G.Sampler()))
    gen.close()
    (copy / "llm" / "generation_config.json").write_text(json.dumps({"eos_token_id": [greedy[4], 12345]}))
    code, text, err = _main(capsys, copy, "--prompt", "Hello", "--max-new-tokens", "8")
    assert code == 0
    assert "[stopped: end-of-sequence token; greedy]" in err and "decode: 4 tokens" in err
    tok = G.load_tokenizer(copy / "llm")
    assert text == tok.decode(greedy[:4]) + "\n"


def test_stops_at_kv_capacity(exports, capsys):
    _, out, _, _ = exports["llama"]
    code, text, err = _main(capsys, out, "--prompt", "Hello world, this is a test.", "--kv-capacity", "16",
                            "--max-new-tokens", "100")
    assert code == 0 and text.endswith("\n")
    # 11 prompt tokens + 5 fed back fill 16 slots; the 6th generated token needs no slot.
    assert "the KV cache is full: its 16 slots hold the prompt (11 tokens) and the first 5 generated tokens" in err
    assert "decode: 5 tokens" in err


@pytest.mark.parametrize("case", ["missing", "not_export", "no_tokenizer", "too_long", "system_without_chat"])
def test_errors_exit_2_with_one_paragraph(exports, tmp_path, capsys, case):
    _, out, _, _ = exports["llama"]
    args = ["--prompt", "Hello world, this is a test."]
    if case == "missing":
        target, expect = tmp_path / "nope", "does not exist"
    elif case == "not_export":
        (tmp_path / "llm").mkdir()
        target, expect = tmp_path, "not an export directory"
    elif case == "no_tokenizer":
        target = shutil.copytree(out, tmp_path / "out")
        (target / "llm" / "tokenizer.json").unlink()
        expect = "has no tokenizer.json"
    elif case == "too_long":
        target, expect = out, "the prompt is 11 tokens, longer than the KV capacity of 8 tokens"
        args += ["--kv-capacity", "8"]
    else:
        target, expect = out, "--system needs --chat"
        args += ["--system", "x"]
    code, text, err = _main(capsys, target, *args)
    assert code == 2 and text == ""
    assert err.startswith("edgellm: error: ") and err.count("\n") == 1 and expect in err, err


def test_ctrl_c_stops_cleanly(exports, capsys, monkeypatch):
    """A real SIGINT during generation: recorded, acted on between steps, exit 130 with the text so far."""
    _, out, _, _ = exports["llama"]
    push = G.StreamDecoder.push
    seen = []

    def push_then_interrupt(self, token_id):
        seen.append(token_id)
        if len(seen) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return push(self, token_id)

    monkeypatch.setattr(G.StreamDecoder, "push", push_then_interrupt)
    code, text, err = _main(capsys, out, "--prompt", "Hello", "--max-new-tokens", "30")
    assert code == 130
    assert len(seen) == 3  # stopped before a fourth step
    assert "[stopped: interrupted; greedy]" in err and "edgellm: generation interrupted" in err
    assert text.endswith("\n")


def test_generate_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import edgellm_validate.generate, edgellm_validate.twin\n"
            "assert 'transformers' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_state_specs_are_generic_over_past_present(tmp_path):
    """KV caches and (hybrid) recurrent states alike: every input with a present_* output is carried."""
    import onnx
    from onnx import TensorProto, helper

    from edgellm_core.bindings import bindings_for
    from edgellm_validate.twin import state_specs

    def vi(name, elem, dims):
        return helper.make_tensor_value_info(name, elem, dims)

    inputs = [vi("inputs_embeds", TensorProto.FLOAT16, ["batch", "seq_len", 64]),
              vi("past_key_values_0", TensorProto.FLOAT8E4M3FN, ["batch", 2, 2, "past_len", 64]),
              vi("conv_state_0", TensorProto.FLOAT16, ["batch", 96, 4]),
              vi("recurrent_state_0", TensorProto.FLOAT, ["batch", 4, 16, 32]),
              vi("last_token_ids", TensorProto.INT64, ["batch", 1])]
    outputs = [vi("logits", TensorProto.FLOAT, ["batch", 1, 8]),
               vi("present_key_values_0", TensorProto.FLOAT8E4M3FN, ["batch", 2, 2, "present_len", 64]),
               vi("present_conv_state_0", TensorProto.FLOAT16, ["batch", 96, 4]),
               vi("present_recurrent_state_0", TensorProto.FLOAT, ["batch", 4, 16, 32])]
    graph = helper.make_graph([], "g", inputs, outputs)
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    specs = {s.past: s for s in state_specs(tmp_path, bindings_for("0.7"))}
    assert {k: s.present for k, s in specs.items()} == {
        "past_key_values_0": "present_key_values_0", "conv_state_0": "present_conv_state_0",
        "recurrent_state_0": "present_recurrent_state_0"}
    kv = specs["past_key_values_0"].zeros(1, 48)
    assert kv.shape == (1, 2, 2, 48, 64) and kv.dtype == np.uint8  # FP8 travels as raw bytes
    assert specs["conv_state_0"].zeros(2, 48).shape == (2, 96, 4)
    rec = specs["recurrent_state_0"].zeros(1, 48)
    assert rec.shape == (1, 4, 16, 32) and rec.dtype == np.float32
