"""Forward hooks that last exactly as long as a `with` block.

Every stage that inspects a pass (pruning's statistics, reconstruction's targets,
distillation's shared layers, the importer's execution order) hooks a model that is
used again afterwards; a hook left behind by a failed pass would silently keep
recording, or change outputs, in the next one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import nn


@contextlib.contextmanager
def hooked(
    hooks: Iterable[tuple[nn.Module, Callable[..., Any]]], *, pre: bool = False
) -> Iterator[None]:
    """Registers each (module, hook) as a forward hook (a forward pre-hook if `pre`) and
    removes them all on leaving the block, however it is left."""
    handles = []
    try:
        for module, hook in hooks:
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            handles.append(register(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
