"""Runtime contracts per Edge-LLM release: graph I/O, plugin signatures, config keys."""

from . import v0_7

CONTRACTS = {"0.7": v0_7}
DEFAULT_TARGET = "0.7"


def get_contract(target: str):
    from edgellm_core.errors import ExportError

    key = ".".join(target.split(".")[:2])
    if key not in CONTRACTS:
        raise ExportError(
            f"unknown Edge-LLM target release {target!r}; supported: {', '.join(sorted(CONTRACTS))}"
        )
    return CONTRACTS[key]
