"""Phi-4-multimodal end to end, as a user runs it: a checkpoint in the original release's layout (`phi4mm`) that
carries its builtin vision and speech LoRA adapters is refused by `edgellm export`, merged with `edgellm merge-lora
CKPT MERGED --builtin vision`, exported, and validated (the golden bundle, its image scenario included).

The reference is independent of our merge code: transformers' Phi4MultimodalForCausalLM (eager attention) on the very
bf16 weights the checkpoint stores, with the vision adapter applied by PEFT (a LoraConfig on the language model's
qkv_proj / o_proj / gate_up_proj / down_proj only, its lora_A / lora_B set to the builtin factors, scale
lora_alpha / r), run on the golden scenarios' tokens and crops. The golden logits must match it at every step; the
base model (no adapter) must not, so the comparison is not vacuous.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from fixtures.tower_checks import row_cosines
from test_phi4mm_visual import IMAGE_TOKEN, TEXT, crops_inputs, make_phi4mm, to_original_layout

from edgellm_export.cli import main

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

MODULES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
LAYER_RE = r"layers.*((self_attn\.(qkv|o)_proj)|(mlp\.(gate_up|down)_proj))"  # as the release's config spells it
ADAPTERS = {"vision": {"r": 8, "lora_alpha": 16}, "speech": {"r": 4, "lora_alpha": 8}}
# The language model's four linears only: the audio encoder has o_proj / gate_up_proj / down_proj too, the vision
# tower q_proj / k_proj / v_proj / out_proj / fc1 / fc2. PEFT full-matches a string target against the module name.
PEFT_TARGET = r"model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)"
FACTOR_STD = 0.1  # B @ A * 2 has entries of std ~0.06, the size of the base weights' (init 0.05)


def add_builtin_adapters(orig: Path, seed: int = 11) -> dict[str, torch.Tensor]:
    """Rewrite `orig` as the release ships the adapters: `<module>.base_layer.weight` plus
    `<module>.lora_A.<name>.weight` [r, in] / `lora_B.<name>.weight` [out, r] (bf16), config's `<name>_lora`."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(orig / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for i in range(TEXT["num_hidden_layers"]):
        for m in MODULES:
            module = f"model.layers.{i}.{m}"
            w = tensors.pop(f"{module}.weight")
            assert w.dtype == torch.bfloat16
            tensors[f"{module}.base_layer.weight"] = w
            for name, spec in ADAPTERS.items():
                tensors[f"{module}.lora_A.{name}.weight"] = (
                    torch.randn(spec["r"], w.shape[1], generator=g) * FACTOR_STD).bfloat16()
                tensors[f"{module}.lora_B.{name}.weight"] = (
                    torch.randn(w.shape[0], spec["r"], generator=g) * FACTOR_STD).bfloat16()
    save_file(tensors, str(orig / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((orig / "config.json").read_text())
    for name, spec in ADAPTERS.items():
        cfg[f"{name}_lora"] = {**spec, "layer": LAYER_RE, "dp": 0.0}
    (orig / "config.json").write_text(json.dumps(cfg))
    return tensors


def peft_reference(base_model, stored: dict[str, torch.Tensor]):
    """A copy of `base_model` with the builtin vision adapter applied by PEFT (factors as stored, in fp32)."""
    ref = copy.deepcopy(base_model)
    spec = ADAPTERS["vision"]
    config = peft.LoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                             target_modules=PEFT_TARGET, bias="none")
    ref = peft.inject_adapter_in_model(config, ref, adapter_name="vision")
    wrapped = sorted(n for n, mod in ref.named_modules() if isinstance(mod, peft.tuners.lora.LoraLayer))
    assert wrapped == sorted(f"model.layers.{i}.{m}" for i in range(TEXT["num_hidden_layers"]) for m in MODULES)
    with torch.no_grad():
        for module in wrapped:
            layer = ref.get_submodule(module)
            assert layer.active_adapters == ["vision"] and layer.scaling["vision"] == spec["lora_alpha"] / spec["r"]
            layer.lora_A["vision"].weight.copy_(stored[f"{module}.lora_A.vision.weight"].float())
            layer.lora_B["vision"].weight.copy_(stored[f"{module}.lora_B.vision.weight"].float())
    return ref.eval()


def logits_at(model, ids: list[int], positions: list[int], **kwargs) -> np.ndarray:
    """Full-sequence forward, logits of the given positions only (the vocabulary is 200k wide)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), logits_to_keep=torch.tensor(positions), **kwargs)
    return out.logits[0].float().numpy()


def teacher_forced(scenario: dict, row: int) -> tuple[list[int], list[int]]:
    """The scenario's row as one sequence (every step's tokens in order) and the position each step's logits are of."""
    seq, positions = [], []
    for st in scenario["steps"]:
        n = 1 if st["phase"] == "decode" else st["context_lengths"][row]
        seq += st["token_ids"][row][:n]
        positions.append(len(seq) - 1)
    return seq, positions


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from safetensors.numpy import load_file

    root = tmp_path_factory.mktemp("phi4mm_lora")
    hf, model = make_phi4mm(root / "hf")
    orig = to_original_layout(hf, root / "orig")
    stored = add_builtin_adapters(orig)
    merged, out = root / "merged", root / "out"
    assert main(["-q", "merge-lora", str(orig), str(merged), "--builtin", "vision"]) == 0
    assert main(["-q", "export", str(merged), str(out)]) == 0  # no audio_config in the original layout here
    assert main(["-q", "validate", str(out), "--result", str(root / "validation.json")]) == 0

    # the reference starts from exactly the weights the checkpoint stores (make_phi4mm's model was saved in bf16
    # and brought back to fp32, so its values are the bf16 ones)
    from safetensors.torch import load_file as load_torch

    state = model.state_dict()
    hf_stored = load_torch(str(hf / "model.safetensors"))
    for k, v in hf_stored.items():
        assert v.dtype == torch.bfloat16 and torch.equal(state[k], v.float()), k
    for k, v in stored.items():
        if ".base_layer." in k:
            assert torch.equal(state[k.replace(".base_layer.", ".")], v.float()), k
    ref = peft_reference(model, stored)

    bundle = json.loads((out / "llm" / "golden" / "bundle.json").read_text())
    expected = load_file(str(out / "llm" / "golden" / "logits.safetensors"))
    crops = load_file(str(out / "visual" / "golden" / "tensors.safetensors"))["input"]
    return dict(root=root, orig=orig, merged=merged, out=out, model=model, ref=ref, stored=stored, bundle=bundle,
                expected=expected, crops=crops, validation=json.loads((root / "validation.json").read_text()))


def test_export_refuses_the_unmerged_checkpoint(pipeline, tmp_path, capsys):
    capsys.readouterr()
    assert main(["-q", "export", str(pipeline["orig"]), str(tmp_path / "out0")]) == 2
    err = capsys.readouterr().err
    assert "unmerged LoRA adapters (speech, vision)" in err and "edgellm merge-lora" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out0").exists() and list(tmp_path.iterdir()) == []


def test_merged_checkpoint_and_export_layout(pipeline):
    from safetensors.torch import load_file

    merged = pipeline["merged"]
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["model_type"] == "phi4mm" and "vision_lora" not in cfg and "speech_lora" not in cfg
    state = load_file(str(merged / "model.safetensors"))
    assert not any("lora_" in k or ".base_layer." in k for k in state)
    # each merged weight is PEFT's W + scale * (B @ A) (get_delta_weight), rounded once to bf16
    ref = pipeline["ref"]
    for i in range(TEXT["num_hidden_layers"]):
        for m in MODULES:
            module = f"model.layers.{i}.{m}"
            layer = ref.get_submodule(module)
            with torch.no_grad():
                want = layer.get_base_layer().weight + layer.get_delta_weight("vision")
            got = state[f"{module}.weight"]
            assert got.dtype == torch.bfloat16
            ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(2.0 ** -126))) - 7)
            assert bool(((got.float() - want).abs() <= ulp).all()), module
            assert (got.float() - layer.get_base_layer().weight).abs().max().item() > 0.05, module
    out = pipeline["out"]
    assert (out / "llm" / "model.onnx").is_file() and (out / "llm" / "golden" / "bundle.json").is_file()
    assert (out / "visual" / "model.onnx").is_file() and (out / "visual" / "phi4mm_gn_proj.safetensors").is_file()
    assert not (out / "audio").exists()
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert {"llm/model.onnx", "visual/model.onnx", "visual/phi4mm_gn_proj.safetensors"} <= set(files)


def test_image_scenario_matches_peft_reference(pipeline, record_property):
    (sc,) = [s for s in pipeline["bundle"]["scenarios"] if s["name"] == "image_prefill_decode"]
    seq, positions = teacher_forced(sc, 0)
    assert seq[: len(sc["steps"][0]["token_ids"][0])].count(IMAGE_TOKEN) == 512 + 16 + 1 + 272
    images = crops_inputs(pipeline["crops"])
    want = logits_at(pipeline["ref"], seq, positions, **images)
    expected = pipeline["expected"]
    got = np.stack([expected[st["logits"]][0] for st in sc["steps"]])
    assert all(np.array_equal(expected[st["logits"]][0], expected[st["logits"]][1]) for st in sc["steps"])
    cos = [float(c) for c in row_cosines(got, want)]
    record_property("image_golden_cosine_vs_peft", min(cos))
    assert min(cos) >= 0.999, cos
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()

    # the adapter really changes the model: the base model (no LoRA) computes something else
    base = logits_at(pipeline["model"], seq, positions[:1], **images)[0]
    base_cos = float(row_cosines(base[None], want[:1])[0])
    record_property("image_prefill_cosine_base_vs_peft", base_cos)
    assert base_cos < 0.99 or int(base.argmax()) != int(want[0].argmax()), base_cos


def test_text_scenarios_match_peft_reference(pipeline, record_property):
    scenarios = [s for s in pipeline["bundle"]["scenarios"] if "image" not in s]
    assert {s["name"] for s in scenarios} >= {"prefill_decode", "chunked_prefill_decode"}
    expected, worst, base_worst = pipeline["expected"], 1.0, 1.0
    for sc in scenarios:
        for row in range(len(sc["steps"][0]["token_ids"])):
            seq, positions = teacher_forced(sc, row)
            want = logits_at(pipeline["ref"], seq, positions)
            got = np.stack([expected[st["logits"]][row] for st in sc["steps"]])
            cos = row_cosines(got, want)
            worst = min(worst, float(cos.min()))
            assert cos.min() >= 0.999, (sc["name"], row, cos)
            assert got.argmax(-1).tolist() == want.argmax(-1).tolist(), (sc["name"], row)
            base = logits_at(pipeline["model"], seq, positions)
            base_worst = min(base_worst, float(row_cosines(base, want).min()))
    record_property("text_golden_cosine_vs_peft", worst)
    record_property("text_cosine_base_vs_peft", base_worst)
    assert base_worst < 0.99, base_worst


def test_validation_passes_with_the_image_scenario(pipeline, record_property):
    res = pipeline["validation"]
    assert res["passed"], res.get("failures")
    steps = [s for s in res["steps"] if s["scenario"] == "image_prefill_decode"]
    (sc,) = [s for s in pipeline["bundle"]["scenarios"] if s["name"] == "image_prefill_decode"]
    assert len(steps) == len(sc["steps"])
    worst = min(s["min_cosine"] for s in steps)
    record_property("validate_image_min_cosine", worst)
    assert worst >= 0.999, steps
    record_property("validate_min_cosine", min(s["min_cosine"] for s in res["steps"]))
