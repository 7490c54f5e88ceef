"""Each criterion computes its paper's score; checked against direct computations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateurs import prune
from secateurs.config import PruneConfig
from secateurs.criteria import lamp_normalize, registry
from secateurs.pipeline import Data, score_targets
from secateurs.scope import ScopeSpec, resolve

ALL = ScopeSpec(skip_first=False, skip_last=False)


def _scores(model, method, batches=None, example=None, pattern="element", **options):
    config = PruneConfig(method=method, sparsity=0.5, scope=ALL, pattern=pattern, method_options=options or None)
    targets = resolve(model, config.scope_)
    return targets, score_targets(model, targets, config, Data(batches or [], None, example, False))


def _two_layer(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _data(seed=1, n=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(7, 6, generator=g), torch.randint(0, 3, (7,), generator=g)) for _ in range(n)]


def _batch_grads(model, batches):
    grads = []
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append(model[0].weight.grad.clone())
    model.zero_grad()
    return torch.stack(grads)


def test_magnitude_is_absolute_weight():
    model = _two_layer()
    _, scores = _scores(model, "magnitude")
    assert torch.equal(scores["0.weight"].squeeze(1), model[0].weight.detach().abs())


def test_wanda_is_weight_times_input_column_norm():
    model, batches = _two_layer(), _data()
    _, scores = _scores(model, "wanda", batches)
    x = torch.cat([b[0] for b in batches])
    expected = model[0].weight.detach().abs() * x.norm(dim=0)
    torch.testing.assert_close(scores["0.weight"].squeeze(1), expected.double(), rtol=1e-5, atol=1e-6)


def test_wanda_keeps_exact_sparsity_in_every_output_row():
    model, batches = _two_layer(), _data()
    prune(model, "wanda", 0.5, calibration=batches, scope=ALL)
    zeros_per_row = (model[0].weight == 0).sum(dim=1)
    assert (zeros_per_row == 3).all()


def test_gradient_taylor_and_obd_use_batch_gradient_statistics():
    model, batches = _two_layer(), _data()
    g = _batch_grads(copy.deepcopy(model), batches).double()
    w = model[0].weight.detach().double()
    _, grad = _scores(model, "gradient", batches)
    _, taylor = _scores(model, "taylor", batches)
    _, obd = _scores(model, "obd", batches)
    torch.testing.assert_close(grad["0.weight"].squeeze(1), g.abs().mean(0))
    # signed, one slice per batch; units take the batch mean of |sum|
    torch.testing.assert_close(taylor["0.weight"].squeeze(2), (w * g).float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(obd["0.weight"].squeeze(1), 0.5 * w.square() * g.square().mean(0))


def test_taylor_scores_a_filter_by_the_absolute_value_of_its_summed_contributions():
    model, batches = _two_layer(), _data()
    g = _batch_grads(copy.deepcopy(model), batches)
    contribution = (model[0].weight.detach() * g).sum(dim=2).abs().mean(0)  # per output neuron
    prune(model, "taylor", 0.4, pattern="output_channel", calibration=batches, scope=ALL)
    kept = model[0].weight.detach().abs().sum(dim=1) > 0
    assert kept.tolist() == (contribution > contribution.sort().values[1]).tolist()


def test_gathering_gradients_leaves_grads_buffers_and_flags_alone(cnn, cnn_batches):
    cnn[0].weight.requires_grad_(False)
    running = cnn[1].running_mean.clone()
    cnn[3].weight.grad = torch.ones_like(cnn[3].weight)
    _scores(cnn, "taylor", cnn_batches)
    assert not cnn[0].weight.requires_grad
    assert torch.equal(cnn[1].running_mean, running)
    assert torch.equal(cnn[3].weight.grad, torch.ones_like(cnn[3].weight))


def test_snip_is_normalised_connection_sensitivity():
    model, batches = _two_layer(), _data()
    g = _batch_grads(copy.deepcopy(model), batches).sum(0).double()
    _, scores = _scores(model, "snip", batches)
    raw = (model[0].weight.detach().double() * g).abs()
    total = sum(float(s.sum()) for s in scores.values())
    assert total == pytest.approx(1.0)
    ratio = scores["0.weight"].squeeze(1) / raw
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))


def test_grasp_is_weight_times_hessian_gradient_product():
    model, batches = _two_layer(), _data(n=2)
    params = [model[0].weight, model[2].weight]

    def loss():
        return sum(F.cross_entropy(model(x) / 200.0, y) for x, y in batches)

    g = torch.autograd.grad(loss(), params)
    grads = torch.autograd.grad(loss(), params, create_graph=True)
    hg = torch.autograd.grad(sum((a * b.detach()).sum() for a, b in zip(grads, g)), params)
    _, scores = _scores(model, "grasp", batches)
    torch.testing.assert_close(
        scores["0.weight"].squeeze(1), (model[0].weight.detach() * hg[0]).double(), rtol=1e-4, atol=1e-10
    )


def test_synflow_matches_the_closed_form_for_a_linear_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))
    _, scores = _scores(model, "synflow", example=torch.zeros(1, 4))
    w1, w2 = model[0].weight.detach().abs().double(), model[1].weight.detach().abs().double()
    # R = 1^T |W2| |W1| 1, so dR/dW1_ij = sum_k |W2|_ki
    expected = w1 * w2.sum(0).unsqueeze(1)
    torch.testing.assert_close(scores["0.weight"].squeeze(1), expected)
    assert not any(p.grad is not None for p in model.parameters())


def test_activation_and_apoz_score_whole_neurons():
    model, batches = _two_layer(), _data()
    _, act = _scores(model, "activation", batches, pattern="output_channel")
    _, apoz = _scores(model, "apoz", batches, pattern="output_channel")
    out = torch.cat([model[0](b[0]) for b in batches]).detach()
    torch.testing.assert_close(act["0.weight"][:, 0, 0], out.abs().mean(0).double())
    torch.testing.assert_close(apoz["0.weight"][:, 0, 0], 1 - (out <= 0).double().mean(0))


def test_lamp_score_is_squared_weight_over_the_tail_sum():
    w = torch.tensor([3.0, -1.0, 2.0])
    # ascending: 1, 2, 3 -> 1/(1+4+9), 4/(4+9), 9/9
    assert lamp_normalize(w).tolist() == pytest.approx([1.0, 1 / 14, 4 / 13])


def test_random_scores_depend_only_on_the_seed():
    a = _scores(_two_layer(), "random")[1]  # seed 0
    config = PruneConfig(method="random", sparsity=0.5, scope=ALL, seed=7)
    model = _two_layer()
    targets = resolve(model, config.scope_)
    b = score_targets(model, targets, config, Data([], show_progress=False))
    c = score_targets(model, targets, config, Data([], show_progress=False))
    assert torch.equal(b["0.weight"], c["0.weight"])
    assert not torch.equal(a["0.weight"], b["0.weight"])


MASKING_METHODS = sorted(name for name, cls in registry().items() if "mask" in cls.modes and not cls.from_training)


@pytest.mark.parametrize("method", MASKING_METHODS)
def test_every_registered_method_is_deterministic_under_a_seed(method, cnn_batches):
    from conftest import small_cnn

    kwargs = dict(calibration=cnn_batches, seed=5, iterations=2, mode="mask")
    if registry()[method].patterns:
        kwargs["pattern"] = "output_channel"
    masks = []
    for _ in range(2):
        model = small_cnn()
        prune(model, method, 0.6, **kwargs, progress=False)
        masks.append({k: v for k, v in model.state_dict().items() if k.endswith("mask")})
    assert masks[0].keys() == masks[1].keys() and masks[0]
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
