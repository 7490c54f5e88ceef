"""Structural removal never changes what a kept computation reads (ARCHITECTURE invariant 9):
constant slices, ``narrow``, ``select`` and index lists on a channel axis freeze exactly the
channels whose removal would move what they read; everything else stays removable, and removing
zeroed channels then leaves the outputs unchanged (invariant 3)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import secateurs
from conftest import assert_unchanged, fingerprint
from secateurs import ScopeError, StructureError
from secateurs.structural import DependencyGraph, remove

C = 12
X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def _read(h: torch.Tensor, op: tuple):
    kind, *a = op
    if kind == "slice":
        return h[:, slice(*a)]
    if kind == "narrow":
        return torch.narrow(h, 1, *a)
    if kind == "select":
        return h.select(1, a[0]).unsqueeze(1)
    if kind == "list":
        return h[:, list(a[0])]
    if kind == "index_select":
        return h.index_select(1, torch.tensor(a[0]))
    if kind == "ellipsis":
        return h.permute(0, 2, 3, 1)[..., slice(*a)].permute(0, 3, 1, 2)
    raise AssertionError(kind)


class Reads(nn.Module):
    """``h`` feeds a layer through the op under test, and another layer whole."""

    def __init__(self, op: tuple) -> None:
        super().__init__()
        self.op = op
        self.produce = nn.Conv2d(3, C, 1)
        width = _read(torch.zeros(1, C, 1, 1), op).shape[1]
        self.through_op = nn.Conv2d(width, 4, 1)
        self.whole = nn.Conv2d(C, 4, 1)

    def forward(self, x):
        h = torch.relu(self.produce(x))
        return self.through_op(_read(h, self.op)) + self.whole(h)


BOUND = st.one_of(st.none(), st.integers(-C - 2, C + 2))
OPS = st.one_of(
    st.tuples(st.just("slice"), BOUND, BOUND, st.sampled_from([None, 1, 2])),
    st.tuples(st.just("ellipsis"), BOUND, BOUND, st.just(None)),
    st.integers(-C, C - 1).flatmap(
        lambda s: st.tuples(st.just("narrow"), st.just(s), st.integers(1, C - s if s >= 0 else -s))
    ),
    st.tuples(st.just("select"), st.integers(-C, C - 1)),
    st.tuples(st.just("list"), st.lists(st.integers(-C, C - 1), min_size=1, max_size=4).map(tuple)),
    st.tuples(st.just("index_select"), st.lists(st.integers(0, C - 1), min_size=1, max_size=4).map(tuple)),
)


def _zero_units(model: Reads, graph: DependencyGraph, units: list[int]) -> str:
    group = next(g for g in graph.groups if any(s.owner == "produce" for s in g.sources))
    view = next(v for v in group.ports if v.port.module == "produce" and v.port.param == "weight")
    channels = [c for c in range(C) if int(view.index[c]) in units]
    with torch.no_grad():
        model.produce.weight[channels] = 0
        model.produce.bias[channels] = 0
    return group.name


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op=OPS, data=st.data())
def test_removing_zeroed_removable_channels_never_changes_what_a_fixed_read_sees(op, data):
    try:
        width = _read(torch.zeros(1, C, 1, 1), op).shape[1]
    except (IndexError, RuntimeError):
        width = 0  # an op that is invalid for this width
    assume(width > 0)
    torch.manual_seed(0)
    model = Reads(op).eval()
    graph = DependencyGraph(model, X)
    group = next(g for g in graph.groups if any(s.owner == "produce" for s in g.sources))
    assume(group.units >= 2)
    units = data.draw(st.lists(st.integers(0, group.units - 1), min_size=1, max_size=group.units - 1, unique=True))
    name = _zero_units(model, graph, units)
    expected = model(X)
    remove(model, {name: units}, X)
    torch.testing.assert_close(model(X), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("op", "free"),
    [
        (("slice", 3, 9, None), [9, 10, 11]),  # before and inside the window move it; after does not
        (("slice", 3, None, None), list(range(3, 12))),  # an open end follows the cut
        (("slice", -4, None, None), list(range(8))),  # counted from the end: what precedes is free
        (("slice", None, -2, None), list(range(10))),
        (("slice", None, None, 2), []),  # a stride depends on every position
        (("narrow", 2, 5), [7, 8, 9, 10, 11]),
        (("select", 4), [5, 6, 7, 8, 9, 10, 11]),
        (("select", -3), list(range(9))),
        (("list", (1, 5)), [6, 7, 8, 9, 10, 11]),
        (("list", (2, -2)), [3, 4, 5, 6, 7, 8, 9]),
    ],
    ids=lambda v: str(v),
)
def test_exactly_the_channels_a_fixed_read_pins_are_frozen(op, free):
    model = Reads(op).eval()
    graph = DependencyGraph(model, X)
    group = next(g for g in graph.groups if any(s.owner == "produce" for s in g.sources))
    views = [v for v in group.ports if v.port.module == "produce" and v.port.param == "weight"]
    assert [c for c in range(C) if views and int(views[0].index[c]) >= 0] == free
    if len(free) < C:
        assert any("reads fixed channel positions" in r for r in group.frozen_reasons)


def test_a_fully_pinned_group_is_refused_naming_the_op():
    class Strided(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(self.a(x)[:, ::2])

    model = Strided().eval()
    before = fingerprint(model)
    with pytest.raises(ScopeError, match=r"Tensor.__getitem__ .* reads fixed channel positions \(\[::2\]\)"):
        secateurs.prune(model, "magnitude", 0.5, mode="remove", pattern="channel", example_inputs=X,
                        progress=False, structural={"latency": False})  # fmt: skip
    assert_unchanged(model, before)


def test_an_op_the_graph_cannot_follow_is_named_not_blamed_on_a_hard_coded_shape():
    class Spectral(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(torch.fft.fft(self.a(x), dim=1).real)  # mixes every channel with every other

    model = Spectral().eval()
    before = fingerprint(model)
    with pytest.raises(StructureError, match=r"unsupported op torch\.fft\.fft"):
        secateurs.prune(model, "magnitude", 0.5, mode="remove", pattern="channel", example_inputs=X,
                        progress=False, structural={"latency": False})  # fmt: skip
    assert_unchanged(model, before)
