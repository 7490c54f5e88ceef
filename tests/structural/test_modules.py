"""Module types the dependency graph handles: attention heads, recurrent units, norms, convs."""

from __future__ import annotations

import pytest
import torch
from structural_nets import TinyTransformer, zero_units
from torch import nn

import secateurs
from secateurs import StructureError
from secateurs.structural import DependencyGraph, Handler, PrunedMultiheadAttention, register_handler, remove

QUIET = {"latency": False}


def _prune(model, pattern, x, sparsity=0.5, **kw):
    return secateurs.prune(
        model, "magnitude", sparsity, pattern=pattern, mode="remove", example_inputs=x, progress=False,
        structural=QUIET, **kw,
    )  # fmt: skip


def test_multihead_attention_head_pruning_really_removes_heads():
    model = TinyTransformer(heads=4).eval()
    ids = torch.randint(0, 50, (2, 6))
    params = sum(p.numel() for p in model.parameters())
    _prune(model, "head", ids)
    for layer in model.encoder.layers:
        attn = layer.self_attn
        assert isinstance(attn, PrunedMultiheadAttention)
        assert attn.num_heads == 2
        assert attn.in_proj_weight.shape == (3 * 2 * 8, 32)
        assert attn.out_proj.in_features == 16
    assert sum(p.numel() for p in model.parameters()) < params
    model(ids).sum().backward()


def test_removing_zeroed_heads_of_multihead_attention_keeps_outputs():
    model = TinyTransformer(heads=4).eval()
    ids = torch.randint(0, 50, (2, 6))
    graph = DependencyGraph(model, ids)
    heads = [g for g in graph.groups if g.kind == "head"]
    removed = {g.name: [1, 2] for g in heads}
    zero_units(model, graph, removed)  # q/k/v rows and biases of those heads: their values are zero
    before = model(ids)
    remove(model, removed, ids)
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-6)


def test_pruned_attention_matches_the_stock_module_with_masks_and_weights():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True).eval()
    ours = PrunedMultiheadAttention.like(mha).eval()
    q = torch.randn(2, 5, 16)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[0, 3:] = True
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for need_weights in (True, False):
        a, wa = mha(q, q, q, key_padding_mask=padding, attn_mask=causal, need_weights=need_weights)
        b, wb = ours(q, q, q, key_padding_mask=padding, attn_mask=causal, need_weights=need_weights)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        if need_weights:
            torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6)


def test_hidden_dim_of_a_transformer_with_multihead_attention_shrinks_everywhere():
    model = TinyTransformer().eval()
    ids = torch.randint(0, 50, (2, 6))
    _prune(model, "hidden", ids)
    assert model.embed.embedding_dim == 16
    for layer in model.encoder.layers:
        assert layer.self_attn.embed_dim == 16 and layer.norm1.normalized_shape == (16,)
        assert layer.linear1.in_features == 16 and layer.linear2.out_features == 16
    assert model.head.in_features == 16
    assert model(ids).shape == (2, 3)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_hidden_units_are_prunable(cls):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cls(6, 8, num_layers=2, batch_first=True, bidirectional=True)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.fc(y[:, -1])

    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(2, 5, 6)
    graph = DependencyGraph(net, x)
    assert graph["rnn"].units == 8
    zero_units(net, graph, {"rnn": [0, 3, 5]})  # rows of every gate in every layer and direction
    before = net(x)
    remove(net, {"rnn": [0, 3, 5]}, x)
    assert net.rnn.hidden_size == 5 and net.fc.in_features == 10
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)
    net.train()
    net(x).sum().backward()


class ProjectedLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=True, proj_size=4)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y, (h, c) = self.rnn(x)
        return self.fc(y[:, -1]) + h.sum() + c.sum()  # sums: removed units are zeros, means would change


def test_an_lstm_with_projections_has_hidden_and_projected_units(tmp_path):
    net, x = ProjectedLSTM().eval(), torch.randn(2, 5, 6)
    graph = DependencyGraph(net, x)
    assert graph["rnn"].units == 8 and graph["rnn.proj"].units == 4
    cut = {"rnn": [0, 3, 5], "rnn.proj": [1]}
    zero_units(net, graph, cut)  # gate rows of the cell units, weight_hr rows of the projected one
    before = net(x)
    remove(net, cut, x)
    assert (net.rnn.hidden_size, net.rnn.proj_size, net.fc.in_features) == (5, 3, 6)
    assert net.rnn.weight_hr_l1_reverse.shape == (3, 5) and net.rnn.weight_ih_l1.shape == (20, 6)
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)
    net.train()
    net(x).sum().backward()
    secateurs.structural.save_structured(net, tmp_path / "p")
    again = secateurs.structural.load_structured(tmp_path / "p", ProjectedLSTM())
    torch.testing.assert_close(again.eval()(x), net.eval()(x))


def test_a_removal_that_leaves_proj_size_not_below_hidden_size_is_refused():
    net, x = ProjectedLSTM().eval(), torch.randn(2, 5, 6)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(StructureError, match=r"proj_size=4 >= hidden_size=4"):
        remove(net, {"rnn": [0, 1, 2, 3]}, x)
    assert net.rnn.hidden_size == 8 and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_transposed_grouped_norms_and_prelu_layers_are_cut_consistently():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.PReLU(8),
        nn.ConvTranspose2d(8, 8, 2, stride=2), nn.InstanceNorm2d(8, affine=True), nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    ).eval()  # fmt: skip
    x = torch.randn(1, 3, 4, 4)
    _prune(net, "channel", x)
    assert net[0].out_channels == net[1].num_channels == net[2].num_parameters == net[3].in_channels
    assert net[3].out_channels == net[4].num_features == net[6].in_channels
    assert net[1].num_channels % net[1].num_groups == 0
    assert net(x).shape == (1, 4, 8, 8)


def test_free_parameters_used_in_forward_are_cut_with_their_channels():
    class WithPositions(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 8)
            self.cls = nn.Parameter(torch.randn(1, 2, 8))  # two register tokens
            self.pos = nn.Parameter(torch.randn(1, 5, 8))
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.proj(x).unsqueeze(1) + self.pos  # one vector broadcast over the positions
            h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], dim=1)
            return self.fc2(torch.relu(self.fc1(h)) + h)[:, 0]

    torch.manual_seed(0)
    net, x = WithPositions().eval(), torch.randn(3, 4)
    _prune(net, "channel", x)
    assert net.proj.out_features == net.cls.shape[2] == net.pos.shape[2] == net.fc2.in_features == 4
    assert net(x).shape == (3, 2)


def test_a_user_handler_makes_an_opaque_module_prunable():
    class Scale(nn.Module):  # forward uses an op the graph cannot follow on its own
        def __init__(self, c):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(c))

        def forward(self, x):
            return torch.einsum("bc,c->bc", x, self.weight)

    class ScaleHandler(Handler):
        name = "test_scale"

        def trace(self, t, name, module, args, kwargs, output):
            vec = t.channel(args[0], -1)
            t.port(name, "weight", 0, vec, "pass", name)
            t.label(output, -1, vec)

    net = nn.Sequential(nn.Linear(4, 8), Scale(8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    with pytest.raises(StructureError, match=r"einsum in '1' \(Scale\).*exclude.*register_handler\(Scale"):
        _prune(net, "channel", x)
    register_handler(Scale, ScaleHandler())
    _prune(net, "channel", x)
    assert net[1].weight.shape == (4,) and net[3].in_features == 4


def test_loading_a_plan_whose_handler_is_not_registered_names_the_handler_and_changes_nothing(tmp_path):
    from secateurs.structural import HANDLERS, load_structured, save_structured
    from secateurs.structural import handlers as registry

    class Gain(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.weight = nn.Parameter(torch.linspace(0.5, 1.5, c))

        def forward(self, x):
            return torch.einsum("bc,c->bc", x, self.weight)

    @register_handler(Gain)  # the decorator form
    class GainHandler(Handler):
        name = "test_gain"

        def trace(self, t, name, module, args, kwargs, output):
            vec = t.channel(args[0], -1)
            t.port(name, "weight", 0, vec, "pass", name)
            t.label(output, -1, vec)

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), Gain(8), nn.ReLU(), nn.Linear(8, 2)).eval()

    net, x = build(), torch.randn(3, 4)
    _prune(net, "channel", x)
    save_structured(net, tmp_path / "p")
    registry._REGISTRY.pop(Gain)
    HANDLERS.unregister("test_gain")
    fresh = build()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(StructureError, match=r"needs the structural handler 'test_gain' for module '1' \(Gain\)"):
        load_structured(tmp_path / "p", fresh)
    assert {k: tuple(v.shape) for k, v in fresh.state_dict().items()} == {k: tuple(v.shape) for k, v in before.items()}
    register_handler(Gain, GainHandler())
    loaded = load_structured(tmp_path / "p", build())
    torch.testing.assert_close(loaded(x), net(x))
