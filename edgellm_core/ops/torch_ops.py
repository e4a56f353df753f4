"""Registering an op's eager face as a torch op, the one way every op module does it.

Through `torch.library.Library` fragments rather than `custom_op`, which would import torch's compiler stack
(seconds) for ops we only run eagerly. torch is imported only when an op is first registered.
"""

from __future__ import annotations

from collections.abc import Callable

_LIBRARIES: list = []  # keeps every op registered for the life of the process


def define_torch_op(namespace: str, schema: str, eager: Callable, fake: Callable | None = None):
    """Define `torch.ops.<namespace>.<name>` from its schema string (`name(Tensor x, ...) -> ...`), run by
    `eager`, with `fake` computing output shapes on meta tensors; returns the op. Callers cache it: a second
    definition of the same name is an error in torch."""
    import torch

    name = schema.split("(", 1)[0].strip()
    lib = torch.library.Library(namespace, "FRAGMENT")
    lib.define(schema)
    lib.impl(name, eager, "CompositeExplicitAutograd")
    if fake is not None:
        lib.impl(name, fake, "Meta")
    _LIBRARIES.append(lib)
    return getattr(getattr(torch.ops, namespace), name)
