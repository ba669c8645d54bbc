"""The part of a forward pass that a change to some convolutions cannot alter, recorded once.

A module that finishes before the first of the changed convolutions finishes computes
only from what was there before them, so a copy of the model that differs in those
convolutions alone gives the same output there. Pruning's scan runs a changed copy per
group and share; replaying that part from the original's pass instead of computing it
again costs nothing in exactness and most of the passes' time for groups deep in the
network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from compressed_perception.models.hooks import hooked


def calls(model: nn.Module, probe: torch.Tensor) -> dict[str, int]:
    """Every submodule that runs, in the order it finishes, with how often it runs."""
    found: dict[str, int] = {}

    def count(name: str) -> Callable[..., None]:
        return lambda *_: found.update({name: found.get(name, 0) + 1})

    with hooked((m, count(n)) for n, m in model.named_modules() if n), torch.no_grad():
        model(probe)
    return found


class Upstream:
    """Per set of convolutions to change, the outermost modules that run once and finish
    before any of them; their outputs are recorded on the original's passes and replayed
    (as copies: a later in-place operation must not reach the record) on changed copies."""

    def __init__(
        self, model: nn.Module, probe: torch.Tensor, changes: Iterable[Sequence[str]]
    ) -> None:
        counts = calls(model, probe)
        order = list(counts)
        self.plans: dict[frozenset[str], list[str]] = {}
        for changed in changes:
            first = min(order.index(name) for name in changed)
            done = [name for name in order[:first] if counts[name] == 1]
            outer = [n for n in done if not any(n.startswith(f"{o}.") for o in done)]
            self.plans[frozenset(changed)] = outer
        self.batches: list[torch.Tensor] = []
        self.recorded: list[dict[str, Any]] = []

    def record(self, model: nn.Module, batch: torch.Tensor) -> Any:
        """The model's output on `batch`, recording what any plan replays for it."""
        names = sorted(set().union(*self.plans.values()))
        found: dict[str, Any] = {}

        def keep(name: str) -> Callable[..., None]:
            def hook(_m: nn.Module, _inputs: object, output: Any) -> None:
                if _replayable(output):
                    found[name] = _copied(output)

            return hook

        with hooked((model.get_submodule(n), keep(n)) for n in names):
            output = model(batch)
        self.batches.append(batch)
        self.recorded.append(found)
        return output

    def run(self, model: nn.Module, changed: Sequence[str], index: int) -> Any:
        """`model`, a copy differing from the recorded one in `changed` alone, on the
        `index`-th batch recorded."""
        recorded = self.recorded[index]
        with Overrides() as overrides:
            for name in self.plans[frozenset(changed)]:
                if name in recorded:  # an output it cannot copy is computed again
                    overrides.replace(model.get_submodule(name), _replay(recorded[name]))
            return model(self.batches[index])


class Overrides:
    """Replacements of some modules' `forward` on the instances, all undone together (on
    leaving a `with` block): each module's class method is its forward again."""

    def __init__(self) -> None:
        self.modules: list[nn.Module] = []

    def __enter__(self) -> Overrides:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.undo()

    def replace(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        module.forward = forward
        self.modules.append(module)

    def undo(self) -> None:
        for module in self.modules:
            del module.forward
        self.modules = []


def _replay(output: Any) -> Callable[..., Any]:
    return lambda *_args, **_kw: _copied(output)


def _replayable(output: Any) -> bool:
    """A tensor, or a plain list or tuple of replayable outputs."""
    if isinstance(output, torch.Tensor):
        return True
    return type(output) in (list, tuple) and all(_replayable(item) for item in output)


def _copied(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.clone()
    return type(output)(_copied(item) for item in output)
