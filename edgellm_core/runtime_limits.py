"""What the Edge-LLM runtime does to an export that no export can change, read from its `config.json`.

`validate` attaches these notes to its result, a qualification case carries them, and `edgellm make` /
`qualify` print them in summary.md, so a release engineer sees them next to the passing figures instead
of finding them on a board. Torch- and onnx-free.
"""

from __future__ import annotations

from collections.abc import Mapping


def runtime_limits(config: Mapping) -> list[str]:
    """One sentence per known limit of the 0.7 runtime that applies to this export."""
    notes = []
    if config.get("model_type") == "hybrid_mamba":
        notes.append(
            "system-prompt cache: the 0.7.1 runtime restores the recurrent and conv states captured after all N "
            "prompt tokens while reusing only N-1 tokens of KV, so a cache hit is not exact for this hybrid; "
            "leave that cache off")
        if config.get("model") == "nemotron_h":
            notes.append(
                "Mamba2 chunked prefill: a plugin library built with CuTe-DSL SSD kernels takes, for calls of 128 "
                "or more tokens on SM 80+ (Mamba head dim and state size 64 or 128), a path that ignores the "
                "incoming SSM state, so later chunks of such a prefill lose the earlier ones; the default build "
                "(no CuTe-DSL SSD) is exact")
    return notes
