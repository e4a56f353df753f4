"""processed_chat_template.json extraction (contract text.md §6.4).

Templates below are written for these tests in the style of the public model
families; transformers' own apply_chat_template is the independent reference.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from edgellm_core.errors import ExportError
from edgellm_export.sidecars.chat_template import (
    build_processed_chat_template,
    write_processed_chat_template,
)

# Qwen2-style ChatML: injects a default system prompt when none is given.
QWEN2 = (
    r"{% for message in messages %}"
    r"{% if loop.first and messages[0]['role'] != 'system' %}"
    r"{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen3-style: no default system prompt; enable_thinking=false pre-closes the think block.
QWEN3 = r"""
{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""

# Llama-3-style: header tokens, bos_token before the first message only.
LLAMA3 = (
    r"{% for message in messages %}"
    r"{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    r" + message['content'] | trim + '<|eot_id|>' %}"
    r"{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    r"{{ content }}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Gemma-style: refuses the system role outright.
NO_SYSTEM = (
    r"{{ bos_token }}{% for message in messages %}"
    r"{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    r"{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    r"{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

FALLBACK_ROLES = {
    "system": {"prefix": "", "suffix": "\n"},
    "user": {"prefix": "User: ", "suffix": "\n"},
    "assistant": {"prefix": "Assistant: ", "suffix": "\n"},
}

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]


def _checkpoint(tmp_path: Path, template=None, **tokens) -> Path:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg = dict(tokens)
    if template is not None:
        cfg["chat_template"] = template
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return ckpt


def _hf_checkpoint(tmp_path: Path, template: str, bos: str, eos: str):
    """A tiny real HF tokenizer, saved the way transformers saves checkpoints."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, bos: 1, eos: 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template,
                                  bos_token=bos, eos_token=eos, unk_token="<unk>")
    ckpt = tmp_path / "hf_ckpt"
    tok.save_pretrained(ckpt)
    return tok, ckpt


def _runtime_render(data: dict, messages: list[dict], thinking: bool = False) -> str:
    """What the Edge-LLM runtime assembles from the sidecar (prefix + content + suffix)."""
    roles = data["roles"]
    out = ""
    if messages[0]["role"] != "system" and data["default_system_prompt"]:
        out += roles["system"]["prefix"] + data["default_system_prompt"] + roles["system"]["suffix"]
    for m in messages:
        out += roles[m["role"]]["prefix"] + m["content"] + roles[m["role"]]["suffix"]
    gen = data["generation_prompt"]
    if thinking and data.get("generation_prompt_thinking"):
        gen = data["generation_prompt_thinking"]
    return out + gen


def test_qwen2_chatml_matches_observed_values(tmp_path):
    ckpt = _checkpoint(tmp_path, QWEN2, eos_token="<|im_end|>")
    data = build_processed_chat_template(ckpt, "Qwen/Qwen2-0.5B-Instruct")
    assert data == {
        "roles": {
            "system": {"prefix": "<|im_start|>system\n", "suffix": "<|im_end|>\n"},
            "user": {"prefix": "<|im_start|>user\n", "suffix": "<|im_end|>\n"},
            "assistant": {"prefix": "<|im_start|>assistant\n", "suffix": "<|im_end|>\n"},
        },
        "content_types": {},
        "generation_prompt": "<|im_start|>assistant\n",
        "default_system_prompt": "You are a helpful assistant.",
        "model_path": "Qwen/Qwen2-0.5B-Instruct",
    }


def test_qwen3_thinking_generation_prompts(tmp_path):
    data = build_processed_chat_template(_checkpoint(tmp_path, QWEN3), "m")
    assert data["generation_prompt"] == "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert data["generation_prompt_thinking"] == "<|im_start|>assistant\n"
    assert data["default_system_prompt"] == ""
    assert data["roles"]["user"] == {"prefix": "<|im_start|>user\n", "suffix": "<|im_end|>\n"}
    assert data["roles"]["system"] == {"prefix": "<|im_start|>system\n", "suffix": "<|im_end|>\n"}


def test_llama3_bos_lives_in_system_prefix_only(tmp_path):
    ckpt = _checkpoint(tmp_path, LLAMA3, bos_token={"content": "<|begin_of_text|>"},
                       eos_token="<|eot_id|>")
    data = build_processed_chat_template(ckpt, "m")
    assert data["roles"] == {
        "system": {"prefix": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n",
                   "suffix": "<|eot_id|>"},
        "user": {"prefix": "<|start_header_id|>user<|end_header_id|>\n\n", "suffix": "<|eot_id|>"},
        "assistant": {"prefix": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                      "suffix": "<|eot_id|>"},
    }
    assert data["generation_prompt"] == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert "generation_prompt_thinking" not in data
    assert data["default_system_prompt"] == ""


@pytest.mark.parametrize(
    "template,bos,eos",
    [(QWEN2, "<|endoftext|>", "<|im_end|>"), (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
     (QWEN3, "<|endoftext|>", "<|im_end|>")],
    ids=["chatml", "llama3", "qwen3"],
)
def test_pieces_reproduce_transformers_rendering(tmp_path, template, bos, eos):
    tok, ckpt = _hf_checkpoint(tmp_path, template, bos, eos)
    data = build_processed_chat_template(ckpt, str(ckpt))
    for thinking in (False, True):
        kwargs = {} if thinking else {"enable_thinking": False}
        expected = tok.apply_chat_template(CONVERSATION, tokenize=False,
                                           add_generation_prompt=True, **kwargs)
        assert _runtime_render(data, CONVERSATION, thinking) == expected


def test_chatml_default_system_prompt_reproduces_user_first_rendering(tmp_path):
    tok, ckpt = _hf_checkpoint(tmp_path, QWEN2, "<|endoftext|>", "<|im_end|>")
    data = build_processed_chat_template(ckpt, "m")
    msgs = CONVERSATION[1:]
    expected = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert _runtime_render(data, msgs) == expected


def test_llama3_user_first_conversation_lacks_only_bos(tmp_path):
    # Known limitation of the prefix/suffix format: the opener has one home (system prefix).
    tok, ckpt = _hf_checkpoint(tmp_path, LLAMA3, "<|begin_of_text|>", "<|eot_id|>")
    data = build_processed_chat_template(ckpt, "m")
    msgs = CONVERSATION[1:]
    expected = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "<|begin_of_text|>" + _runtime_render(data, msgs) == expected


def test_template_without_system_role(tmp_path, caplog):
    ckpt = _checkpoint(tmp_path, NO_SYSTEM, bos_token="<bos>", eos_token="<eos>")
    with caplog.at_level(logging.WARNING):
        data = build_processed_chat_template(ckpt, "m")
    assert "system message" in caplog.text
    assert data["roles"] == {
        "system": {"prefix": "", "suffix": ""},
        "user": {"prefix": "<bos><start_of_turn>user\n", "suffix": "<end_of_turn>\n"},
        "assistant": {"prefix": "<start_of_turn>model\n", "suffix": "<end_of_turn>\n"},
    }
    assert data["generation_prompt"] == "<start_of_turn>model\n"


def test_system_only_refused_cuts_system_from_system_plus_user(tmp_path):
    # Qwen3.5-style: a conversation without a user turn is rejected.
    guard = ("{% if messages | selectattr('role', 'equalto', 'user') | list | length == 0 %}"
             "{{ raise_exception('No user query found in messages.') }}{% endif %}")
    data = build_processed_chat_template(_checkpoint(tmp_path, guard + QWEN3), "m")
    assert data["roles"]["system"] == {"prefix": "<|im_start|>system\n", "suffix": "<|im_end|>\n"}
    assert data["roles"]["user"] == {"prefix": "<|im_start|>user\n", "suffix": "<|im_end|>\n"}


def test_empty_injected_system_block_is_baked_into_user_prefix(tmp_path):
    template = QWEN2.replace("You are a helpful assistant.", "")
    data = build_processed_chat_template(_checkpoint(tmp_path, template), "m")
    assert data["default_system_prompt"] == ""
    assert data["roles"]["user"]["prefix"] == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")
    assert data["roles"]["system"]["prefix"] == "<|im_start|>system\n"


def test_template_list_default_wins(tmp_path):
    listed = [{"name": "tool_use", "template": LLAMA3}, {"name": "default", "template": QWEN2}]
    data = build_processed_chat_template(_checkpoint(tmp_path, listed), "m")
    assert data["default_system_prompt"] == "You are a helpful assistant."


def test_chat_template_json_file(tmp_path):
    ckpt = _checkpoint(tmp_path)
    (ckpt / "chat_template.json").write_text(json.dumps({"chat_template": QWEN3}))
    data = build_processed_chat_template(ckpt, "m")
    assert data["roles"]["user"]["prefix"] == "<|im_start|>user\n"


def test_fallback_without_template(tmp_path, caplog):
    ckpt = _checkpoint(tmp_path, bos_token="<s>")
    with caplog.at_level(logging.WARNING):
        data = build_processed_chat_template(ckpt, "some/model")
    assert "no chat template" in caplog.text
    assert data == {
        "roles": FALLBACK_ROLES,
        "content_types": {},
        "generation_prompt": "Assistant: ",
        "default_system_prompt": "",
        "model_path": "some/model",
    }


@pytest.mark.parametrize("attack", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ joiner.__init__.__globals__['__builtins__']['open']('MARKER', 'w').write('x') }}",
])
def test_sandbox_escape_falls_back_without_side_effect(tmp_path, caplog, monkeypatch, attack):
    marker = tmp_path / "MARKER"
    attack = attack.replace("MARKER", str(marker))
    monkeypatch.chdir(tmp_path)
    # The attack sits in an otherwise valid template, so only the sandbox stops it.
    ckpt = _checkpoint(tmp_path, attack + QWEN2)
    with caplog.at_level(logging.WARNING):
        data = build_processed_chat_template(ckpt, "m")
    assert data["roles"] == FALLBACK_ROLES
    assert "SecurityError" in caplog.text
    assert not marker.exists()


def test_system_branch_escape_condemns_whole_template(tmp_path, caplog):
    attack = "{% if messages[0].role == 'system' %}{{ ''.__class__.__mro__ }}{% endif %}"
    ckpt = _checkpoint(tmp_path, attack + QWEN3)
    with caplog.at_level(logging.WARNING):
        data = build_processed_chat_template(ckpt, "m")
    assert data["roles"] == FALLBACK_ROLES


def test_existing_sidecar_copied_byte_for_byte(tmp_path):
    ckpt = _checkpoint(tmp_path, QWEN2)
    raw = '{"roles": {"user": {"prefix": "U:"}},  "model_path": "x", "note": "caf\u00e9"}\r\n'
    (ckpt / "processed_chat_template.json").write_bytes(raw.encode("utf-8"))
    out = write_processed_chat_template(ckpt, tmp_path / "out", "ignored")
    assert out == tmp_path / "out" / "processed_chat_template.json"
    assert out.read_bytes() == raw.encode("utf-8")
    assert build_processed_chat_template(ckpt, "ignored")["model_path"] == "x"


def test_existing_sidecar_without_roles_is_rejected(tmp_path):
    ckpt = _checkpoint(tmp_path, QWEN2)
    bad = ckpt / "processed_chat_template.json"
    bad.write_text('{"roles": []}')
    with pytest.raises(ExportError) as err:
        write_processed_chat_template(ckpt, tmp_path / "out", "m")
    assert str(bad) in str(err.value)


def test_invalid_tokenizer_config_raises_export_error(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg = ckpt / "tokenizer_config.json"
    cfg.write_text('{"chat_template": "x",')
    with pytest.raises(ExportError) as err:
        build_processed_chat_template(ckpt, "m")
    assert str(cfg) in str(err.value)
    assert err.value.path == str(cfg)


def test_written_file_is_deterministic(tmp_path):
    ckpt = _checkpoint(tmp_path, QWEN3)
    first = write_processed_chat_template(ckpt, tmp_path / "a", "m").read_bytes()
    second = write_processed_chat_template(ckpt, tmp_path / "b", "m").read_bytes()
    assert first == second
    assert first.endswith(b"}\n")
    data = json.loads(first)
    assert list(data) == ["roles", "content_types", "generation_prompt",
                          "generation_prompt_thinking", "default_system_prompt", "model_path"]
