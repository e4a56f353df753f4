"""`processed_chat_template.json` sidecar (contract text.md §6.3 / §6.4).

The Edge-LLM runtime cannot run Jinja: it builds a prompt as
`prefix + content + suffix` per message plus a generation prompt. We recover
those strings by rendering the checkpoint's HF chat template with placeholder
messages and cutting the output around the placeholders.

Chat templates are untrusted code from the checkpoint, so they are rendered
only in jinja2's immutable sandbox; transformers is deliberately not imported.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgellm_core.errors import ExportError

log = logging.getLogger(__name__)

FILENAME = "processed_chat_template.json"
SYS = "<placeholder_system_prompt>"
USER = "<placeholder_user_text>"
ASST = "<placeholder_assistant_text>"
_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


class _Unusable(Exception):
    """The template cannot be reduced to prefixes/suffixes; use the fallback."""


def _fallback(model_path: str) -> dict:
    # Same values as the reference's write_fallback_processed_chat_template.
    return {
        "roles": {
            "system": {"prefix": "", "suffix": "\n"},
            "user": {"prefix": "User: ", "suffix": "\n"},
            "assistant": {"prefix": "Assistant: ", "suffix": "\n"},
        },
        "content_types": {},
        "generation_prompt": "Assistant: ",
        "default_system_prompt": "",
        "model_path": model_path,
    }


def _read(path: Path, as_json: bool = True) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if as_json else text
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        kind = "JSON" if as_json else "UTF-8 text"
        raise ExportError(f"cannot be read as {kind} ({e}); fix or remove it.", path) from e


def _pick_template(value: Any) -> str | None:
    # HF allows a list of named templates; "default" is what apply_chat_template uses.
    if isinstance(value, list):
        named = [t for t in value if isinstance(t, dict)]
        chosen = next((t for t in named if t.get("name") == "default"), named[0] if named else {})
        value = chosen.get("template")
    return value if isinstance(value, str) and value.strip() else None


def _load_template(ckpt: Path) -> tuple[str | None, dict[str, str]]:
    cfg_path = ckpt / "tokenizer_config.json"
    cfg = _read(cfg_path) if cfg_path.is_file() else {}
    if not isinstance(cfg, dict):
        raise ExportError("must contain a JSON object.", cfg_path)
    # Special tokens are a string or an AddedToken dict {"content": ...}.
    raw = {n: cfg.get(n) for n in _SPECIAL_TOKENS}
    raw = {n: t.get("content") if isinstance(t, dict) else t for n, t in raw.items()}
    tokens = {n: t for n, t in raw.items() if isinstance(t, str)}
    template = _pick_template(cfg.get("chat_template"))
    if template is None and (ckpt / "chat_template.jinja").is_file():
        template = _pick_template(_read(ckpt / "chat_template.jinja", as_json=False))
    if template is None and (ckpt / "chat_template.json").is_file():
        data = _read(ckpt / "chat_template.json")
        template = _pick_template(data.get("chat_template") if isinstance(data, dict) else None)
    return template, tokens


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; HF templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _make_renderer(source: str, tokens: dict[str, str]) -> Callable[..., str]:
    # Same environment shape as transformers so templates render identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception  # templates use it to reject input
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    template = env.from_string(source)

    def render(roles: str, gen: bool = False, **extra: Any) -> str:
        text = {"s": ("system", SYS), "u": ("user", USER), "a": ("assistant", ASST)}
        msgs = [{"role": text[r][0], "content": text[r][1]} for r in roles]
        return template.render(messages=msgs, tools=None, documents=None,
                               add_generation_prompt=gen, **tokens, **extra)

    return render


def _try(render: Callable[..., str], roles: str, **kw: Any) -> str | None:
    # Optional renders: many templates legitimately refuse some shapes.
    try:
        return render(roles, **kw)
    except SecurityError:
        raise  # an escape attempt condemns the whole template, not just this shape
    except Exception:  # noqa: BLE001 - templates refuse shapes with arbitrary errors
        return None


def _split(text: str | None, placeholder: str, need: bool = False) -> tuple[str, str] | None:
    """(before, after) the placeholder; None if absent, or _Unusable when `need`."""
    if text is None or placeholder not in text:
        if need:
            raise _Unusable(f"cannot locate {placeholder} in the rendered template")
        return None
    i = text.index(placeholder)
    return text[:i], text[i + len(placeholder):]


def _appended(plain: str, longer: str) -> str:
    # Usually a pure append; some templates rewrite the tail, so cut at the first difference.
    return longer[len(os.path.commonprefix([plain, longer])):]


def _extract(render: Callable[..., str]) -> dict:
    r_s, r_su, r_u = _try(render, "s"), _try(render, "su"), _try(render, "u")
    u_only = _split(r_u, USER)

    # System prefix/suffix: system-only render, else cut out of system+user.
    has_system = True
    if (sys_only := _split(r_s, SYS)) is not None:
        sys_pre, sys_suf = sys_only
    elif _split(r_su, SYS) is not None and u_only is not None:
        sys_pre, rest = _split(r_su, SYS)
        between = rest[: rest.find(USER)] if USER in rest else None
        if between is None or not between.endswith(u_only[0]):
            raise _Unusable("cannot separate the system suffix from the user prefix")
        sys_suf = between[: len(between) - len(u_only[0])]
    else:
        has_system = False
        sys_pre = sys_suf = ""
        log.warning("chat template does not render a system message; system text "
                    "will be passed to the model without role markers")

    # The user turn as it appears right after a system turn.
    u_after = None
    if has_system and r_su is not None and SYS in r_su:
        after = r_su[r_su.index(SYS) + len(SYS):]
        if after.startswith(sys_suf):
            u_after = _split(after[len(sys_suf):], USER)

    default_system = ""
    injected = has_system and u_only is not None and bool(sys_pre) and sys_pre in u_only[0]
    if injected:
        # User-only render carries a system block: its content is the default system prompt.
        closing = sys_suf + (u_after[0] if u_after else "")
        start = u_only[0].index(sys_pre) + len(sys_pre)
        end = len(u_only[0]) - len(closing)
        if u_after is None or not u_only[0].endswith(closing) or end < start:
            raise _Unusable("the injected system block cannot be delimited")
        default_system = u_only[0][start:end]
        # An empty injected block cannot be expressed by the runtime (it only injects
        # non-empty defaults), so bake it into the user prefix as the contract says.
        user_pre, user_suf = u_only if default_system == "" else u_after
    elif u_only is not None:
        user_pre, user_suf = u_only
        if u_after is not None and user_pre != u_after[0] and user_pre.endswith(u_after[0]):
            opener = user_pre[: len(user_pre) - len(u_after[0])]
            # A conversation opener such as BOS: keep it once, in the system prefix,
            # so it is not repeated before every user turn.
            if sys_pre.startswith(opener):
                user_pre = u_after[0]
    elif u_after is not None:
        user_pre, user_suf = u_after
    else:
        raise _Unusable("cannot locate the user message in any render")

    # Assistant: the tail that an assistant turn adds after (system+)user.
    base = "s" if has_system else ""
    r_bu = render(base + "u")
    r_bua = render(base + "ua")
    if r_bua.startswith(r_bu):
        tail = r_bua[len(r_bu):]
    else:
        tail = _split(r_bua, USER, need=True)[1]
        tail = tail.removeprefix(user_suf)
    asst_pre, asst_suf = _split(tail, ASST, need=True)

    # Generation prompt: what add_generation_prompt appends to a user-only render.
    gen_roles, plain = ("u", r_u) if r_u is not None else (base + "u", r_bu)
    gen = _appended(plain, render(gen_roles, gen=True, enable_thinking=False))
    thinking = _try(render, gen_roles, gen=True)
    thinking = _appended(plain, thinking) if thinking is not None else gen

    out: dict[str, Any] = {
        "roles": {
            "system": {"prefix": sys_pre, "suffix": sys_suf},
            "user": {"prefix": user_pre, "suffix": user_suf},
            "assistant": {"prefix": asst_pre, "suffix": asst_suf},
        },
        "content_types": {},
        "generation_prompt": gen,
    }
    if thinking != gen:
        out["generation_prompt_thinking"] = thinking
    out["default_system_prompt"] = default_system
    return out


def _existing(checkpoint_dir: Path) -> Path | None:
    path = Path(checkpoint_dir) / FILENAME
    if not path.is_file():
        return None
    data = _read(path)
    if not isinstance(data, dict) or not isinstance(data.get("roles"), dict):
        raise ExportError("must be a JSON object with a 'roles' object (Edge-LLM "
                          "rejects it otherwise); fix or remove it.", path)
    return path


def build_processed_chat_template(checkpoint_dir: Path, model_path: str) -> dict:
    """The sidecar's content: shipped file, extracted from the template, or fallback."""
    checkpoint_dir = Path(checkpoint_dir)
    shipped = _existing(checkpoint_dir)
    if shipped is not None:
        return _read(shipped)
    source, tokens = _load_template(checkpoint_dir)
    if source is None:
        log.warning("%s: no chat template found; writing the generic User:/Assistant: "
                    "fallback chat template", checkpoint_dir)
        return _fallback(model_path)
    try:
        data = _extract(_make_renderer(source, tokens))
    except Exception as e:  # noqa: BLE001 - untrusted template: fall back, never crash
        log.warning("%s: chat template could not be turned into prefixes/suffixes "
                    "(%s: %s); writing the generic User:/Assistant: fallback",
                    checkpoint_dir, type(e).__name__, e)
        return _fallback(model_path)
    data["model_path"] = model_path
    return data


def write_processed_chat_template(checkpoint_dir: Path, out_dir: Path, model_path: str) -> Path:
    """Write `out_dir/processed_chat_template.json`; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / FILENAME
    shipped = _existing(Path(checkpoint_dir))
    if shipped is not None:
        # Shipped files are authoritative (reference copies them verbatim).
        if shipped.resolve() != dest.resolve():
            shutil.copyfile(shipped, dest)
        return dest
    data = build_processed_chat_template(Path(checkpoint_dir), model_path)
    text = json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
    dest.write_text(text, encoding="utf-8")
    return dest
