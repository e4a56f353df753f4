"""Tokenizer files copied verbatim next to the graph (contract §6.3)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from edgellm_core.errors import ExportError

log = logging.getLogger(__name__)
COPIED = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")
REQUIRED_BY_BUILDER = ("tokenizer.json", "tokenizer_config.json")


def _check_json(path: Path, need_key: str | None) -> None:
    """The runtime parses these files; a broken one must fail here, not on the device."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"is not valid JSON ({e}); the Edge-LLM tokenizer could not load it", path) from None
    if not isinstance(obj, dict) or (need_key and not isinstance(obj.get(need_key), dict)):
        what = f"an object with a {need_key!r} object" if need_key else "a JSON object"
        raise ExportError(f"must be {what}; the Edge-LLM tokenizer could not load it", path)


def copy_tokenizer_files(checkpoint_dir: Path, out_dir: Path) -> list[str]:
    """Copy (never execute) the tokenizer files, after checking the JSON ones parse."""
    copied = []
    for name in COPIED:
        src = checkpoint_dir / name
        if src.is_file():
            if name.endswith(".json"):
                _check_json(src, "model" if name == "tokenizer.json" else None)
            shutil.copyfile(src, out_dir / name)  # follows HF-cache symlinks
            copied.append(name)
    missing = [n for n in REQUIRED_BY_BUILDER if n not in copied]
    if missing:
        log.warning(
            "%s: no %s in the checkpoint; llm_build will refuse this export until they are added",
            checkpoint_dir, " or ".join(missing),
        )
    return copied
