"""Tokenizer files copied verbatim next to the graph (contract §6.3)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
COPIED = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")
REQUIRED_BY_BUILDER = ("tokenizer.json", "tokenizer_config.json")


def copy_tokenizer_files(checkpoint_dir: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in COPIED:
        src = checkpoint_dir / name
        if src.is_file():
            shutil.copyfile(src, out_dir / name)  # follows HF-cache symlinks
            copied.append(name)
    missing = [n for n in REQUIRED_BY_BUILDER if n not in copied]
    if missing:
        log.warning(
            "%s: no %s in the checkpoint; llm_build will refuse this export until they are added",
            checkpoint_dir, " or ".join(missing),
        )
    return copied
