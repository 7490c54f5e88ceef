"""Group criteria reproduce their papers' rankings on constructed cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateurs
from secateurs import ConfigError
from secateurs.pipeline import Data
from secateurs.structural import DependencyGraph
from secateurs.structural.criteria import FLAP, GroupLAMP, GroupTaylor, as_group_criterion
from secateurs.structural.pipeline import score_groups


def _scores(model, x, method, batches=(), pattern=("channel",), **options):
    config = secateurs.PruneConfig(method=method, sparsity=0.5, mode="remove", method_options=options or None)
    graph = DependencyGraph(model, x)
    groups = [g for g in graph.groups if g.kind in pattern and g.units]
    criterion = as_group_criterion(config.criterion_)
    ev, scores = score_groups(model, criterion, groups, config, Data(list(batches), None, x, False))
    return graph, criterion, ev, scores


def test_bn_scale_ranks_channels_by_the_batchnorm_gamma():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    net[1].weight.data = torch.tensor([0.5, -0.1, 2.0, 0.3])
    _, _, _, scores = _scores(net, torch.randn(1, 3, 2, 2), "bn_scale")
    torch.testing.assert_close(scores["0"], torch.tensor([0.5, 0.1, 2.0, 0.3], dtype=torch.float64))


def test_fpgm_removes_the_filter_at_the_geometric_median_not_the_smallest():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 5, 1, bias=False)
    center = torch.tensor([10.0, 10.0])
    conv.weight.data = (center + torch.tensor([[0.0, 0.0], [3, 0], [-3, 0], [0, 3], [0, -3]])).reshape(5, 2, 1, 1)
    net = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(5, 1, 1)).eval()
    x = torch.randn(1, 2, 2, 2)
    _, _, _, scores = _scores(net, x, "fpgm")
    assert int(scores["0"].argmin()) == 0  # the filter at the centre is redundant
    _, _, _, magnitude = _scores(net, x, "magnitude", norm=2)
    assert int(magnitude["0"].argmin()) != 0  # ... though it is not the smallest


def test_group_lamp_gives_the_largest_unit_of_every_group_score_one():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    _, criterion, _, scores = _scores(net, torch.randn(2, 4), "lamp")
    assert isinstance(criterion, GroupLAMP)
    for s in scores.values():
        assert float(s.max()) == 1.0


def test_group_taylor_is_the_squared_sum_of_gradient_times_weight_per_unit():
    """Molchanov et al. 2019, eq. 8, averaged over minibatches."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    batches = [(torch.randn(5, 3), torch.randint(0, 2, (5,))) for _ in range(3)]
    _, criterion, _, scores = _scores(net, batches[0][0], "taylor", batches)
    assert isinstance(criterion, GroupTaylor)
    expected = torch.zeros(4, dtype=torch.float64)
    for x, y in batches:
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        w1, b1, w2 = net[0].weight, net[0].bias, net[2].weight
        unit = (w1.grad * w1).sum(1) + b1.grad * b1 + (w2.grad * w2).sum(0)
        expected += unit.double().square()
    torch.testing.assert_close(scores["0"], expected / 3, rtol=1e-5, atol=1e-9)


def test_activation_criteria_remove_dead_neurons_first():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        net[0].weight[3] = 0.0
        net[0].bias[3] = 0.0  # never fires
    batches = [torch.randn(8, 4) for _ in range(2)]
    for method in ("activation", "apoz"):
        _, _, _, scores = _scores(net, batches[0], method, batches)
        assert int(scores["0"].argmin()) == 3


def test_flap_scores_weighted_input_fluctuation_and_its_compensation_is_exact_for_constant_inputs():
    """A neuron whose output never varies has zero fluctuation (removed first), and FLAP's bias
    compensation replaces it by its mean exactly (An et al. 2024, arXiv:2312.11983)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        net[0].weight[2] = 0.0
        net[0].bias[2] = 1.5  # constant output 1.5
    batches = [torch.randn(16, 4) for _ in range(2)]
    x = batches[0]
    _, criterion, ev, scores = _scores(net, x, "flap", batches)
    assert isinstance(criterion, FLAP)
    stats = ev.evidence.activations["2.weight"]
    metric = stats.input_variance * net[2].weight.detach().double().square().sum(0)
    standardised = (metric - metric.mean()) / metric.std()
    torch.testing.assert_close(scores["0"], standardised)
    assert int(scores["0"].argmin()) == 2
    before = net(x)
    secateurs.prune(net, "flap", 1 / 6, mode="remove", example_inputs=x, calibration=batches, allocation="uniform",
                    progress=False, structural={"latency": False})  # fmt: skip
    assert net[0].out_features == 5
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)


def test_block_influence_removes_the_block_that_changes_its_input_least():
    class Block(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.scale = scale

        def forward(self, x):
            return x + self.scale * self.fc(x)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Sequential(Block(1.0), Block(0.01), Block(1.0)), nn.Linear(8, 2)).eval()
    batches = [torch.randn(6, 4) for _ in range(2)]
    report = secateurs.prune(net, "shortgpt", 1 / 3, pattern="layer", mode="remove", example_inputs=batches[0],
                             calibration=batches, progress=False, structural={"latency": False})  # fmt: skip
    assert report.removed_blocks == ["1.1"]
    assert len(net[1]) == 2
    with pytest.raises(ConfigError, match="an explicit allocation cannot name blocks"):  # keys would be ignored
        secateurs.prune(net, "shortgpt", None, allocation={"1.0": 0.5}, pattern="layer", mode="remove",
                        example_inputs=batches[0], calibration=batches, progress=False)  # fmt: skip


def test_a_criterion_refuses_groups_it_cannot_read_before_anything_runs():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    with pytest.raises(ConfigError, match=r"'bn_scale' reads the scale of an affine BatchNorm.*\['0'\]"):
        secateurs.prune(net, "bn_scale", 0.5, mode="remove", example_inputs=torch.randn(2, 4), progress=False)
