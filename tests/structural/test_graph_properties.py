"""Invariants on random CNN / MLP graphs with residual adds, concat, chunk, split and grouped convs.

Removing units whose producing weights are all zero must leave the outputs unchanged
(ARCHITECTURE invariant 3), and the pruned model must run forward and backward.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st
from structural_nets import zero_units
from torch import nn

from secateurs.errors import StructureError
from secateurs.structural import DependencyGraph, remove


class RandomNet(nn.Module):
    """Interprets a small program: each instruction reads earlier values and appends new ones."""

    def __init__(self, program: list[tuple], layers: dict[str, nn.Module], image: bool) -> None:
        super().__init__()
        self.program = program
        self.layers = nn.ModuleDict(layers)
        self.image = image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        for op, *args in self.program:
            if op == "layer":
                name, src = args
                values.append(self.layers[name](values[src]))
            elif op == "residual":
                name, src = args
                values.append(torch.relu(values[src] + self.layers[name](values[src])))
            elif op == "cat":
                values.append(torch.cat([values[args[0]], values[args[1]]], dim=1))
            elif op == "chunk":
                a, b = values[args[0]].chunk(2, dim=1)
                values += [a, torch.relu(b)]
            elif op == "split":  # fixed sizes: those channels are frozen, the rest still prunable
                src, first = args
                a, b = values[src].split([first, values[src].shape[1] - first], dim=1)
                values += [a, b]
        y = values[-1]
        if self.image:
            y = nn.functional.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.layers["head"](y)


def _conv(cin: int, cout: int, groups: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, groups=groups), nn.BatchNorm2d(cout), nn.ReLU())


def _dense(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Linear(cin, cout), nn.BatchNorm1d(cout), nn.ReLU())


@st.composite
def random_nets(draw: st.DrawFn) -> tuple[RandomNet, torch.Tensor]:
    image = draw(st.booleans())
    widths = [3 if image else 6]  # channels of every value
    layers: dict[str, nn.Module] = {}
    program: list[tuple] = []

    def add_layer(src: int, cout: int, groups: int = 1) -> None:
        name = f"l{len(layers)}"
        layers[name] = _conv(widths[src], cout, groups) if image else _dense(widths[src], cout)
        program.append(("layer", name, src))
        widths.append(cout)

    add_layer(0, draw(st.integers(2, 6)) * 2)
    for _ in range(draw(st.integers(1, 5))):
        src = draw(st.integers(1, len(widths) - 1))
        kind = draw(st.sampled_from(["layer", "grouped", "depthwise", "residual", "cat", "chunk", "split"]))
        c = widths[src]
        if kind == "residual":
            name = f"l{len(layers)}"
            layers[name] = (nn.Conv2d(c, c, 3, padding=1, groups=2 if c % 2 == 0 else 1)
                            if image else nn.Linear(c, c))  # fmt: skip
            program.append(("residual", name, src))
            widths.append(c)
        elif kind == "cat":
            other = draw(st.integers(1, len(widths) - 1))
            program.append(("cat", src, other))
            widths.append(c + widths[other])
        elif kind == "chunk" and c % 2 == 0:
            program.append(("chunk", src))
            widths += [c // 2, c // 2]
        elif kind == "split" and c >= 2:
            first = draw(st.integers(1, c - 1))
            program.append(("split", src, first))
            widths += [first, c - first]
        elif kind == "grouped" and image and c % 2 == 0:
            add_layer(src, draw(st.integers(1, 4)) * 2, groups=2)
        elif kind == "depthwise" and image:
            add_layer(src, c, groups=c)
        else:
            add_layer(src, draw(st.integers(2, 8)))
    layers["head"] = nn.Linear(widths[-1], 3)
    torch.manual_seed(draw(st.integers(0, 1000)))
    net = RandomNet(program, layers, image)
    for m in net.modules():  # non-trivial statistics, so zeroing (not luck) is what keeps outputs equal
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.normal_()
    x = torch.randn(2, 3, 6, 6) if image else torch.randn(4, 6)
    return net.eval(), x


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_nets(), st.data())
def test_removing_zero_units_leaves_outputs_unchanged_and_the_model_trains(case, data):
    net, x = case
    graph = DependencyGraph(net, x)
    removed = {}
    for g in graph.groups:
        if g.units > 1:
            k = data.draw(st.integers(0, g.units - 1), label=f"how many from {g.name}")
            if k:
                removed[g.name] = data.draw(st.permutations(range(g.units)), label=g.name)[:k]
    zero_units(net, graph, removed)
    before = net(x)
    params = sum(p.numel() for p in net.parameters())
    try:
        graph.step(removed)
    except StructureError as exc:  # units of uneven width (a concat) can cover a whole layer: a refusal, up front
        assert "every channel" in str(exc)
        reject()
    remove(net, removed, x)
    torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5)
    if removed:
        assert sum(p.numel() for p in net.parameters()) < params
    net.train()
    net(x).square().mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_nets())
def test_every_unit_of_a_group_lives_in_the_same_places(case):
    """Units are exact classes: every port of a group covers each unit the same number of times
    (e.g. a grouped conv position appears once per group), so a cut is never ragged.

    Not with ``chunk``: tying the halves makes a unit span one channel of one tensor and two of
    another (``cat(a, b).chunk(2)`` ties a's channels to each other and to b's), so units of one
    group legitimately differ in width; the removal property above covers those graphs."""
    net, x = case
    assume(all(op != "chunk" for op, *_ in net.program))
    graph = DependencyGraph(net, x)
    for g in graph.groups:
        for view in g.ports:
            counts = torch.bincount(view.index[view.index >= 0], minlength=g.units)
            touched = counts[counts > 0]
            assert touched.numel() == 0 or bool((touched == touched[0]).all()), (g.name, view.port.key)
        assert g.units == 0 or math.isfinite(float(g.unit_params.sum()))


def test_a_layer_added_to_a_fixed_size_split_piece_is_not_offered_as_free():
    """Found by the property test above: ``a, b = x.split([3, 1]); a + layer(a)``. The pieces of a
    fixed-size split are blocked, and the residual ties ``layer``'s outputs to them, so its units
    must not look removable (removing one would break the add)."""
    torch.manual_seed(0)
    layers = {"l0": _dense(6, 4), "l1": nn.Linear(3, 3), "head": nn.Linear(3, 3)}
    net = RandomNet([("layer", "l0", 0), ("split", 1, 3), ("residual", "l1", 2)], layers, image=False).eval()
    graph = DependencyGraph(net, torch.randn(4, 6))
    assert all(g.units == 0 for g in graph.groups if "l1" in g.name or g.name.startswith("layers.l0")), [
        (g.name, g.units, g.frozen) for g in graph.groups
    ]
