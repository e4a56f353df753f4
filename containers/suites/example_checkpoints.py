"""Write the checkpoints containers/suites/example.yaml names into DIR (its $EDGELLM_CHECKPOINTS):

    python containers/suites/example_checkpoints.py DIR

- DIR/demo: the built-in demo Llama (edgellm_export.demo_checkpoint), byte-for-byte reproducible.
- DIR/llama3-rope: a small random Llama with Llama-3 RoPE scaling whose attention is sharp enough for
  RoPE to matter within the golden prompts, made with transformers the way the tests make theirs
  (tests/conftest.py; needs torch, transformers and pytest).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import LLAMA3_ROPE, make_hf_model, save_checkpoint  # noqa: E402

from edgellm_export.demo_checkpoint import write_demo_checkpoint  # noqa: E402


def main(out: Path) -> None:
    write_demo_checkpoint(out / "demo")
    save_checkpoint(make_hf_model("llama", rope_parameters=LLAMA3_ROPE), out / "llama3-rope")
    print(f"wrote {out / 'demo'} and {out / 'llama3-rope'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
