"""`edgellm merge-lora`: static LoRA merge into a checkpoint, checked against PEFT itself.

The reference is PEFT: a tiny Phi-3 made with transformers, wrapped with `get_peft_model` (lora_A and lora_B set to
random non-zero values, PEFT inits B to zero), its adapter saved with `save_pretrained`. The merged checkpoint is
loaded with transformers and compared with the PEFT model's forward and with `merge_and_unload()`'s weights.
Builtin adapters (Phi-4-multimodal's layout) are checked against W + (alpha / r) * B @ A computed here.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from edgellm_export.cli import main

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
EXTRA_FILES = {"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}\n',
               "tokenizer_config.json": '{"model_max_length": 256}\n',
               "chat_template.jinja": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}",
               "preprocessor_config.json": '{"image_size": 448}\n'}


def phi3_config():
    return transformers.Phi3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)


def save_base(model, path: Path, dtype, **save_kwargs) -> Path:
    model.to(dtype).save_pretrained(path, **save_kwargs)
    model.float()
    for name, text in EXTRA_FILES.items():
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One tiny Phi-3 saved in fp32, in bf16, and in fp32 as 2+ shards."""
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(phi3_config()).eval()
    root = tmp_path_factory.mktemp("base")
    return {"fp32": save_base(model, root / "fp32", torch.float32),
            "bf16": save_base(model, root / "bf16", torch.bfloat16),
            "sharded": save_base(model, root / "sharded", torch.float32, max_shard_size="100KB")}


def make_adapter(ckpt: Path, out: Path, seed: int = 1, **lora):
    """The PEFT reference: ckpt loaded in fp32, random non-zero A and B, adapter saved as safetensors."""
    model = transformers.Phi3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    kwargs = dict(r=8, lora_alpha=16, target_modules=TARGETS)
    kwargs.update(lora)
    pm = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    pm.save_pretrained(out)
    return pm


def merge(ckpt, out, *extra, capsys=None) -> tuple[int, str, str]:
    rc = main(["merge-lora", str(ckpt), str(out), *map(str, extra)])
    captured = capsys.readouterr() if capsys else None
    return rc, captured.out if captured else "", captured.err if captured else ""


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def merged_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at each element's magnitude (8 significant bits)."""
    mag = x.float().abs().clamp_min(2.0 ** -126)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 128, 64, 1, 200, 33, 77, 150, 9, 240]])


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits[0].float()


# -- PEFT adapters -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [{}, {"use_rslora": True},
                                  {"rank_pattern": {"o_proj": 16}, "alpha_pattern": {"down_proj": 32}}],
                         ids=["plain", "rslora", "patterns"])
def test_fp32_adapter_matches_peft(base, tmp_path, capsys, lora):
    pm = make_adapter(base["fp32"], tmp_path / "adapter", **lora)
    ref_logits = logits_of(pm)
    out = tmp_path / "merged"
    rc, stdout, _ = merge(base["fp32"], out, "--adapter", tmp_path / "adapter", capsys=capsys)
    assert rc == 0
    scales = {"plain": "scale 2)", "rslora": f"scale {16 / math.sqrt(8):g})", "patterns": "scales 1, 2, 4)"}
    key = "rslora" if lora.get("use_rslora") else "patterns" if lora else "plain"
    assert stdout.strip() == f"merged 8 modules ({scales[key]} from {tmp_path / 'adapter'} into {out}"

    merged = transformers.Phi3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = logits_of(merged)
    base_logits = logits_of(transformers.Phi3ForCausalLM.from_pretrained(base["fp32"], dtype=torch.float32).eval())
    assert cosine(base_logits, ref_logits) < 0.999  # the adapter changes the model: the check below is not vacuous
    assert cosine(got, ref_logits) >= 0.9999
    assert torch.equal(got.argmax(-1), ref_logits.argmax(-1))
    assert (got - ref_logits).abs().max().item() < 1e-4

    # merge_and_unload's weights, exactly: same fp32 arithmetic, (B @ A) * scale then added
    ref_state = pm.merge_and_unload().state_dict()
    state = merged_state(out)
    assert set(state) == set(ref_state) and not any("lora" in k or "base_layer" in k for k in state)
    for k, v in state.items():
        assert torch.equal(v, ref_state[k]), k
    # untouched tensors and the other files are byte-identical; the index is absent (one input file)
    from safetensors import safe_open

    with safe_open(base["fp32"] / "model.safetensors", "pt") as src, safe_open(out / "model.safetensors", "pt") as dst:
        for k in src.keys():
            if not any(t in k for t in TARGETS):
                assert torch.equal(src.get_tensor(k).view(torch.uint8), dst.get_tensor(k).view(torch.uint8)), k
        assert dst.metadata() == {"format": "pt"}
    for name in [*EXTRA_FILES, "generation_config.json", "config.json"]:
        assert (out / name).read_bytes() == (base["fp32"] / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == sorted([*EXTRA_FILES, "generation_config.json", "config.json",
                                                            "model.safetensors"])
    assert not list(tmp_path.glob(".merged.*"))


def test_bf16_adapter_within_one_ulp_of_peft_fp32_merge(base, tmp_path, capsys):
    # PEFT loaded from the bf16 checkpoint upcast to fp32 (exact), merged in fp32, cast to bf16: the reference
    pm = make_adapter(base["bf16"], tmp_path / "adapter")
    ref_logits = logits_of(pm)
    ref = {k: v.to(torch.bfloat16) for k, v in pm.merge_and_unload().state_dict().items()}
    out = tmp_path / "merged"
    assert merge(base["bf16"], out, "--adapter", tmp_path / "adapter", capsys=capsys)[0] == 0
    state = merged_state(out)
    assert set(state) == set(ref)
    changed = 0
    for k, v in state.items():
        assert v.dtype == torch.bfloat16, k
        diff = (v.float() - ref[k].float()).abs()
        assert bool((diff <= bf16_ulp(ref[k])).all()), k
        assert (diff > 0).float().mean().item() < 0.01, k  # nearly all elements exactly PEFT's
        changed += any(t in k for t in TARGETS)
    assert changed == 8
    merged = transformers.Phi3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = logits_of(merged)
    assert cosine(got, ref_logits) >= 0.9999
    assert torch.equal(got.argmax(-1), ref_logits.argmax(-1))


def test_fan_in_fan_out_gpt2(tmp_path, capsys):
    """GPT-2's Conv1D weights are [in, out]: PEFT sets fan_in_fan_out and the delta is transposed."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(tmp_path / "gpt2")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, fan_in_fan_out=True,
                                                    target_modules=["c_attn", "c_proj", "c_fc"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval().save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ref_logits = logits_of(pm)
    rc, stdout, _ = merge(tmp_path / "gpt2", tmp_path / "merged", "--adapter", tmp_path / "adapter", capsys=capsys)
    assert rc == 0 and stdout.startswith("merged 8 modules (scale 2)")
    got = logits_of(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval())
    assert cosine(got, ref_logits) >= 0.9999 and torch.equal(got.argmax(-1), ref_logits.argmax(-1))


def test_sharded_checkpoint(base, tmp_path, capsys):
    shards = sorted(p.name for p in base["sharded"].glob("*.safetensors"))
    assert len(shards) >= 2
    pm = make_adapter(base["sharded"], tmp_path / "adapter")
    ref_logits = logits_of(pm)
    out = tmp_path / "merged"
    assert merge(base["sharded"], out, "--adapter", tmp_path / "adapter", capsys=capsys)[0] == 0
    n = len(shards)
    assert sorted(p.name for p in out.glob("*.safetensors")) == [f"model-{i:05d}-of-{n:05d}.safetensors"
                                                                 for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    src_index = json.loads((base["sharded"] / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == src_index["weight_map"]  # one output shard per input shard, same names
    assert index["metadata"]["total_size"] == src_index["metadata"]["total_size"]
    merged = transformers.Phi3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = logits_of(merged)
    assert cosine(got, ref_logits) >= 0.9999 and torch.equal(got.argmax(-1), ref_logits.argmax(-1))
    ref_state = pm.merge_and_unload().state_dict()
    for k, v in merged_state(out).items():
        assert torch.equal(v, ref_state[k]), k


# -- builtin adapters (Phi-4-multimodal's layout) ----------------------------------------------------------------------
BUILTIN = {"vision": {"r": 8, "lora_alpha": 16}, "speech": {"r": 4, "lora_alpha": 12}}


@pytest.fixture(scope="module")
def phi4mm_style(base, tmp_path_factory):
    """The bf16 tiny model's weights renamed as phi4mm ships them: <module>.base_layer.weight plus
    <module>.lora_A/B.<name>.weight for vision and speech, and config.json's vision_lora / speech_lora; sharded
    as Phi-4-multimodal is."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("phi4mm") / "ckpt"
    shutil.copytree(base["bf16"], path)
    state = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    out, plain = {}, {}
    for k, w in state.items():
        module = k.removesuffix(".weight")
        if not any(module.endswith(t) for t in TARGETS):
            out[k] = w
            continue
        out[f"{module}.base_layer.weight"] = w
        plain[k] = w
        for name, spec in BUILTIN.items():
            out[f"{module}.lora_A.{name}.weight"] = (torch.randn(spec["r"], w.shape[1], generator=g) * 0.1).bfloat16()
            out[f"{module}.lora_B.{name}.weight"] = (torch.randn(w.shape[0], spec["r"], generator=g) * 0.1).bfloat16()
    # two shards, keys dealt alternately: a module's base weight and its LoRA factors often sit in different files
    (path / "model.safetensors").unlink()
    names = sorted(out)
    weight_map = {}
    for i in range(2):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: out[k] for k in names[i::2]}, path / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in names[i::2]})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((path / "config.json").read_text())
    layers = r"layers.*((self_attn\.(qkv|o)_proj)|(mlp\.(gate_up|down)_proj))"
    cfg["vision_lora"] = {**BUILTIN["vision"], "layer": layers, "dp": 0.0}
    cfg["speech_lora"] = {**BUILTIN["speech"], "layer": layers, "dp": 0.01}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path, out, plain


def weight_map_of(ckpt: Path) -> dict[str, str]:
    return json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]


def builtin_reference(tensors: dict, module: str, name: str) -> torch.Tensor:
    """W + (lora_alpha / r) * B @ A in fp32 (not yet cast back)."""
    spec = BUILTIN[name]
    a = tensors[f"{module}.lora_A.{name}.weight"].float()
    b = tensors[f"{module}.lora_B.{name}.weight"].float()
    return tensors[f"{module}.base_layer.weight"].float() + (spec["lora_alpha"] / spec["r"]) * (b @ a)


def test_builtin_vision_merged_speech_dropped(phi4mm_style, base, tmp_path, capsys):
    ckpt, tensors, plain = phi4mm_style
    out = tmp_path / "merged"
    rc, stdout, stderr = merge(ckpt, out, "--builtin", "vision", capsys=capsys)
    assert rc == 0
    assert stdout.strip() == f"merged 8 modules (scale 2) from builtin adapter 'vision' of {ckpt} into {out}"
    assert "dropped builtin adapter 'speech' (16 tensors and config key speech_lora)" in stderr
    state = merged_state(out)
    assert not any("lora" in k or "base_layer" in k for k in state)
    assert set(state) == {k for k in tensors if "lora" not in k and "base_layer" not in k} | set(plain)
    for k in plain:
        ref = builtin_reference(tensors, k.removesuffix(".weight"), "vision")
        v = state[k]
        assert v.dtype == torch.bfloat16
        assert bool(((v.float() - ref.bfloat16().float()).abs() <= bf16_ulp(ref)).all()), k
        assert (v != ref.bfloat16()).float().mean().item() < 0.01, k
        assert (v.float() - plain[k].float()).abs().max().item() > 0.05, k  # the delta is really there
    for k, v in state.items():
        if k not in plain:
            assert torch.equal(v.view(torch.uint8), tensors[k].view(torch.uint8)), k
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(index.values())) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sorted(index) == sorted(state)
    assert [k for k, s in index.items() if s.startswith("model-00001")] == sorted(
        k.replace(".base_layer.", ".") for k, s in weight_map_of(ckpt).items()
        if s.startswith("model-00001") and ".lora_" not in k)
    cfg = json.loads((out / "config.json").read_text())
    assert "vision_lora" not in cfg and "speech_lora" not in cfg
    assert cfg["model_type"] == "phi3" and cfg["hidden_size"] == 64
    # the merged checkpoint is a plain one: transformers loads it, and it computes the merged weights
    merged = transformers.Phi3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref_model = transformers.Phi3ForCausalLM.from_pretrained(base["bf16"], dtype=torch.float32).eval()
    with torch.no_grad():
        for k in plain:
            ref_model.get_parameter(k).copy_(builtin_reference(tensors, k.removesuffix(".weight"), "vision"))
    ref_logits, got = logits_of(ref_model), logits_of(merged)
    assert cosine(got, ref_logits) >= 0.9999 and torch.equal(got.argmax(-1), ref_logits.argmax(-1))


def test_builtin_then_adapter(phi4mm_style, base, tmp_path, capsys):
    ckpt, tensors, plain = phi4mm_style
    make_adapter(base["bf16"], tmp_path / "adapter", seed=5)
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    out = tmp_path / "merged"
    rc, stdout, _ = merge(ckpt, out, "--builtin", "speech", "--adapter", tmp_path / "adapter", capsys=capsys)
    assert rc == 0
    assert stdout.strip() == (f"merged 8 modules (scale 3) from builtin adapter 'speech' of {ckpt} and 8 modules "
                              f"(scale 2) from {tmp_path / 'adapter'} into {out}")
    state = merged_state(out)
    for k in plain:
        module = k.removesuffix(".weight")
        a = adapter[f"base_model.model.{module}.lora_A.weight"].float()
        b = adapter[f"base_model.model.{module}.lora_B.weight"].float()
        ref = builtin_reference(tensors, module, "speech") + 2.0 * (b @ a)
        assert bool(((state[k].float() - ref.bfloat16().float()).abs() <= bf16_ulp(ref)).all()), k


def test_drop_builtin_keeps_base_weights(phi4mm_style, tmp_path, capsys):
    ckpt, tensors, plain = phi4mm_style
    out = tmp_path / "merged"
    rc, stdout, stderr = merge(ckpt, out, "--drop-builtin", capsys=capsys)
    assert rc == 0 and stdout.strip() == f"merged 0 modules into {out}"
    assert stderr.count("dropped builtin adapter") == 2
    state = merged_state(out)
    for k in plain:
        assert torch.equal(state[k].view(torch.uint8), plain[k].view(torch.uint8))
    cfg = json.loads((out / "config.json").read_text())
    assert "vision_lora" not in cfg and "speech_lora" not in cfg


# -- refusals: exit 2, the message names the path, nothing is left behind ----------------------------------------------
def _adapter_copy(tmp_path, adapter_root) -> Path:
    dst = tmp_path / "adapter"
    shutil.copytree(adapter_root, dst)
    return dst


@pytest.fixture(scope="module")
def good_adapter(base, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    make_adapter(base["fp32"], path)
    return path


def _edit_adapter_config(adapter: Path, **changes) -> Path:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return adapter / "adapter_config.json"


def _edit_adapter_tensors(adapter: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    f = adapter / "adapter_model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)
    return f


LAYER0_QKV = "base_model.model.model.layers.0.self_attn.qkv_proj"


def _bad_cases():
    def out_inside_ckpt(t, b, a, p):
        out = b["fp32"] / "merged"
        return [b["fp32"], out, "--adapter", a], out, "inside the checkpoint directory"

    def out_contains_adapter(t, b, a, p):
        return [b["fp32"], a.parent, "--adapter", a], a.parent, "contains the adapter directory"

    def out_is_cwd(t, b, a, p):
        (t / "here").mkdir()
        p.chdir(t / "here")
        return [b["fp32"], ".", "--adapter", a], t / "here", "the current directory"

    def out_is_home(t, b, a, p):
        (t / "home").mkdir()
        p.setenv("HOME", str(t / "home"))
        return [b["fp32"], t / "home", "--adapter", a], t / "home", "your home directory"

    def out_is_root(t, b, a, p):
        return [b["fp32"], "/", "--adapter", a], "/: ", "the filesystem root"

    def out_not_empty(t, b, a, p):
        (t / "merged").mkdir()
        (t / "merged" / "keep.txt").write_text("mine")
        return [b["fp32"], t / "merged", "--adapter", a], t / "merged", "not empty"

    def dora(t, b, a, p):
        ad = _adapter_copy(t, a)
        return [b["fp32"], t / "merged", "--adapter", ad], _edit_adapter_config(ad, use_dora=True), "DoRA"

    def modules_to_save(t, b, a, p):
        ad = _adapter_copy(t, a)
        f = _edit_adapter_config(ad, modules_to_save=["lm_head"])
        return [b["fp32"], t / "merged", "--adapter", ad], f, "modules_to_save"

    def missing_module(t, b, a, p):
        ad = _adapter_copy(t, a)

        def edit(ts):
            for ab in "AB":
                ts[f"base_model.model.model.layers.7.self_attn.qkv_proj.lora_{ab}.weight"] = ts[
                    f"{LAYER0_QKV}.lora_{ab}.weight"].clone()

        f = _edit_adapter_tensors(ad, edit)
        return [b["fp32"], t / "merged", "--adapter", ad], f, "'model.layers.7.self_attn.qkv_proj'"

    def shape_mismatch(t, b, a, p):
        ad = _adapter_copy(t, a)

        def edit(ts):
            ts[f"{LAYER0_QKV}.lora_A.weight"] = torch.randn(8, 48)

        f = _edit_adapter_tensors(ad, edit)
        return [b["fp32"], t / "merged", "--adapter", ad], f, f"'{LAYER0_QKV}.lora_A.weight'"

    def pickled_adapter(t, b, a, p):
        ad = _adapter_copy(t, a)
        (ad / "adapter_model.safetensors").unlink()
        (ad / "adapter_model.bin").write_bytes(b"never unpickled")
        return [b["fp32"], t / "merged", "--adapter", ad], ad, "must be safetensors"

    def builtin_without_choice(t, b, a, p, phi4mm=None):
        return [phi4mm, t / "merged"], phi4mm, "builtin LoRA adapters (speech, vision)"

    def builtin_unknown(t, b, a, p, phi4mm=None):
        return [phi4mm, t / "merged", "--builtin", "audio"], phi4mm, "no builtin adapter of that name"

    def builtin_on_plain(t, b, a, p):
        return [b["fp32"], t / "merged", "--builtin", "vision"], b["fp32"], "no builtin LoRA adapters"

    return {f.__name__: f for f in (out_inside_ckpt, out_contains_adapter, out_is_cwd, out_is_home, out_is_root,
                                    out_not_empty, dora,
                                    modules_to_save, missing_module, shape_mismatch, pickled_adapter,
                                    builtin_without_choice, builtin_unknown, builtin_on_plain)}


BAD = _bad_cases()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, base, good_adapter, phi4mm_style, tmp_path, capsys, monkeypatch):
    make = BAD[case]
    kwargs = {"phi4mm": phi4mm_style[0]} if case.startswith("builtin_") and case != "builtin_on_plain" else {}
    args, path, phrase = make(tmp_path, base, good_adapter, monkeypatch, **kwargs)
    out = Path(args[1]).absolute()
    existed = out.exists()
    before = sorted(p.name for p in out.parent.iterdir()) if out != Path("/") else None
    rc, stdout, stderr = merge(*args, capsys=capsys)
    assert rc == 2, stderr
    assert stderr.startswith("edgellm: error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert str(path) in stderr and phrase in stderr, stderr
    assert stdout == ""
    assert out.exists() == existed  # OUT not created, nothing beside it either
    if before is not None:
        assert sorted(p.name for p in out.parent.iterdir()) == before


def test_failure_mid_write_leaves_nothing(base, good_adapter, tmp_path, capsys, monkeypatch):
    """Disk full while the other files are copied (after the shards are written): exit 3, no OUT, no partial
    directory, and the parents merge-lora created for OUT are gone again."""
    import errno

    from edgellm_export import lora_merge

    def full(src, dst, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(lora_merge.shutil, "copy2", full)
    out = tmp_path / "new" / "deeper" / "merged"
    rc, stdout, stderr = merge(base["fp32"], out, "--adapter", good_adapter, capsys=capsys)
    assert rc == 3 and "No space left on device" in stderr and stdout == ""
    assert list(tmp_path.iterdir()) == []
