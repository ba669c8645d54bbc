"""Replaying what a change cannot alter: a replayed pass of a changed copy equals a full
pass, bit for bit, and what is replayed really is not computed again."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch", reason="pruning needs the build extra (torch)")
from torch import nn  # noqa: E402

from compressed_perception.compress.prune import normalized_batches  # noqa: E402
from compressed_perception.compress.upstream import Upstream  # noqa: E402

from conftest import original_model  # noqa: E402

# a conv per depth: the first reads the image (nothing to replay), the last is the head's
CHANGES = (
    ["backbone.stem.conv"],
    ["backbone.stages.1.res_blocks.0.mid_conv.conv"],
    ["backbone.stages.3.in_conv.conv", "neck.lateral.2"],
    ["neck.lateral.0"],
    ["head.preds.0"],
)


def _changed(model: nn.Module, names: list[str], seed: int = 0) -> nn.Module:
    changed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            weight = changed.get_submodule(name).weight
            weight.add_(0.1 * torch.randn(weight.shape, generator=generator))
    return changed


def _equal(a: list, b: list) -> bool:
    """NanoDet outputs, per level (class logits, box logits), equal bit for bit."""
    flat_a = [tensor for level in a for tensor in level]
    flat_b = [tensor for level in b for tensor in level]
    return len(flat_a) == len(flat_b) and all(
        torch.equal(x, y) for x, y in zip(flat_a, flat_b, strict=True)
    )


@pytest.fixture(scope="module")
def model_and_batch(frames):
    model = original_model().eval()
    images = [frame[:416, :416].copy() for frame in frames[:2]]
    return model, normalized_batches(model, images)[0]


def test_a_replayed_pass_of_a_changed_copy_equals_its_full_pass(model_and_batch):
    model, batch = model_and_batch
    upstream = Upstream(model, batch[:1], CHANGES)
    assert upstream.plans[frozenset(CHANGES[0])] == []
    assert "backbone.stages.0" in upstream.plans[frozenset(CHANGES[1])]
    assert upstream.plans[frozenset(CHANGES[-1])] == ["backbone", "neck", "head.convs.0"]
    with torch.no_grad():
        reference = upstream.record(model, batch)
        assert _equal(reference, model(batch))
        for names in CHANGES:
            changed = _changed(model, names)
            full = changed(batch)
            assert not _equal(full, reference), names
            assert _equal(upstream.run(changed, names, 0), full), names
            # the replays are undone: every module runs its own forward again
            assert not any("forward" in vars(module) for module in changed.modules()), names


def test_what_is_replayed_is_not_computed_again(model_and_batch):
    """Changing a layer before the named ones breaks the contract: the replay must not
    see it, which shows that the layer did not run."""
    model, batch = model_and_batch
    upstream = Upstream(model, batch[:1], [["head.preds.0"]])
    with torch.no_grad():
        reference = upstream.record(model, batch)
        early = _changed(model, ["backbone.stem.conv"])
        assert not _equal(early(batch), reference)
        assert _equal(upstream.run(early, ["head.preds.0"], 0), reference)


class _Doubling(nn.Module):
    """Returns a dict (not replayable) and doubles its input in place."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": x.mul_(2.0)}


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = _Doubling()
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x))["y"])


def test_outputs_changed_in_place_or_not_copyable_are_handled():
    """`b` doubles `a`'s output in place: a replay that handed out the record itself
    would double it again on every pass. `b` returns a dict, so it runs every time."""
    net = _Net().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    upstream = Upstream(net, x[:1], [["c"]])
    assert upstream.plans[frozenset({"c"})] == ["a", "b"]
    with torch.no_grad():
        upstream.record(net, x)
        assert set(upstream.recorded[0]) == {"a"}
        changed = _changed(net, ["c"])
        full = changed(x)
        for _ in range(3):
            assert torch.equal(upstream.run(changed, ["c"], 0), full)


def test_hooks_are_gone_after_a_pass_that_fails() -> None:
    """A hook left behind by a failed pass would keep recording on the next one."""
    from compressed_perception.models.hooks import hooked

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    seen: list[str] = []
    hooks = [
        (model[0], lambda *_: seen.append("forward")),
        (model[1], lambda *_: seen.append("relu")),
    ]
    with hooked(hooks):
        model(torch.zeros(1, 3, 2, 2))
    assert seen == ["forward", "relu"]
    with pytest.raises(RuntimeError, match="channels"), hooked(hooks):
        model(torch.zeros(1, 5, 2, 2))  # wrong channel count: the pass fails in conv
    with hooked([(model[1], lambda *_: seen.append("pre"))], pre=True):
        model(torch.zeros(1, 3, 2, 2))
    model(torch.zeros(1, 3, 2, 2))
    assert seen == ["forward", "relu", "pre"]
    assert not model[0]._forward_hooks and not model[1]._forward_pre_hooks
