"""mode='reconstruct' on any model: SparseGPT's OBS update on Linear and Conv layers (conv through unfolded
input patches, as OBC), fixed masks from any criterion, bias compensation, and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import secateurs
from secateurs import ConfigError, DataRequiredError, StateError
from secateurs.evidence import hessian_rows
from secateurs.layout import layout_of, to_canonical
from secateurs.scope import Target
from secateurs.testing import calibration, small_cnn


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, padding=1),
        nn.Conv2d(4, 6, (3, 2), stride=2, dilation=(1, 2), padding=(2, 1)),
        nn.Conv2d(4, 6, 3, groups=2, padding=1),
        nn.Conv2d(4, 4, 3, groups=4, padding="same"),  # depthwise
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
        nn.Conv1d(4, 6, 5, stride=2, padding=2),
        nn.Linear(4, 6),
    ],
    ids=["conv", "strided", "grouped", "depthwise", "reflect", "conv1d", "linear"],
)
def test_hessian_rows_are_the_inputs_the_canonical_weight_multiplies(conv):
    """For every layer type the rows, times the canonical weight, give the layer's output: so the Hessian
    built from them is the layer's, and the solver's columns line up with the weight's."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 7) if isinstance(conv, nn.Conv2d) else torch.randn(2, 4, 11)
    if isinstance(conv, nn.Linear):
        x = torch.randn(2, 5, 4)
    target = Target("layer", conv, layout_of(conv))
    rows = hessian_rows(target, x)
    w3 = to_canonical(conv.weight.detach(), target.layout)
    out, spatial, inp = w3.shape
    groups = rows.shape[1] if rows.ndim == 3 else 1
    rows = rows.reshape(rows.shape[0], groups, -1)
    per_group = w3.reshape(groups, out // groups, spatial * inp)
    y = torch.einsum("pgc,goc->pgo", rows, per_group).reshape(rows.shape[0], out)
    expected = conv(x) - (conv.bias if conv.bias is not None else 0).reshape(*([1] * (conv(x).ndim - 1)), -1) \
        if isinstance(conv, nn.Linear) else conv(x) - conv.bias.reshape(1, -1, *([1] * (x.ndim - 2)))  # fmt: skip
    expected = expected.reshape(-1, out) if isinstance(conv, nn.Linear) else expected.movedim(1, -1).reshape(-1, out)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def _output_error(model: nn.Module, reference: nn.Module, batches) -> float:
    with torch.no_grad():
        return sum(float((model(x) - reference(x)).square().sum()) for x, _ in batches)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_on_a_cnn_keeps_outputs_closer_than_magnitude_or_wanda(sparsity):
    """Whole-model runner, conv layers included: the OBS update reconstructs each layer's output."""
    batches = calibration(batches=6)
    dense = small_cnn()
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = small_cnn()
        secateurs.prune(model, method, sparsity, calibration=batches, mode="bake" if method != "sparsegpt" else None,
                        progress=False)  # fmt: skip
        errors[method] = _output_error(model, dense, batches)
    assert errors["sparsegpt"] < min(errors["wanda"], errors["magnitude"]), errors


def test_the_solver_reconstructs_a_mask_chosen_by_another_criterion():
    batches = calibration(batches=6)
    dense, masked, solved = small_cnn(), small_cnn(), small_cnn()
    secateurs.prune(masked, "magnitude", 0.6, mode="bake", progress=False)
    report = secateurs.prune(solved, "magnitude", 0.6, mode="reconstruct", calibration=batches, progress=False)
    assert report.config["solver"] == "sparsegpt"
    for a, b in zip(masked.state_dict().values(), solved.state_dict().values()):
        assert torch.equal(a == 0, b == 0) or a.ndim < 2  # the same mask; only the survivors moved
    assert _output_error(solved, dense, batches) < 0.7 * _output_error(masked, dense, batches)
    assert [layer.name for layer in report.details.solved] == [layer.name for layer in report.layers]


def test_bias_compensation_keeps_each_layers_mean_output():
    """FLAP's compensation as a solver of mode='reconstruct': a pruned input is replaced by its mean."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = [(torch.randn(64, 8) + 3.0, torch.zeros(64, dtype=torch.long)) for _ in range(4)]
    hidden = torch.cat([model[1](model[0](x)) for x, _ in batches]).detach()
    before = model[2](hidden).mean(0).detach()
    secateurs.prune(model, "magnitude", 0.5, mode="reconstruct", solver="bias_compensation",
                    scope={"skip_first": False, "skip_last": False}, calibration=batches, progress=False)  # fmt: skip
    torch.testing.assert_close(model[2](hidden).mean(0), before, rtol=1e-4, atol=1e-4)
    assert float((model[2].weight == 0).float().mean()) == 0.5


def test_reconstruction_refusals_name_the_way_out():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataRequiredError, match="solver 'sparsegpt' needs calibration data"):
        secateurs.prune(model, "sparsegpt", 0.5, progress=False)
    with pytest.raises(ConfigError, match=r"solver 'sparsegpt' serves mode 'reconstruct', not 'remove'"):
        secateurs.prune(model, "magnitude", 0.5, mode="remove", solver="sparsegpt", progress=False)
    with pytest.raises(ConfigError, match="mode='mask' takes no solver"):
        secateurs.prune(model, "magnitude", 0.5, solver="sparsegpt", progress=False)
    with pytest.raises(
        ConfigError, match="method 'sparsegpt' supports mode 'bake', 'mask', 'reconstruct', not 'remove'"
    ):
        secateurs.prune(model, "sparsegpt", 0.5, mode="remove", progress=False)
    with pytest.raises(ConfigError, match="no bias to fold"):
        bare = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))
        secateurs.prune(bare, "magnitude", 0.5, mode="reconstruct", solver="bias_compensation",
                        calibration=[torch.randn(3, 4)], progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="Embedding"):
        emb = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
        secateurs.prune(emb, "sparsegpt", 0.5, scope={"embeddings": True, "skip_last": False},
                        calibration=[torch.randint(0, 10, (3,))], progress=False)  # fmt: skip
    secateurs.prune(model, "magnitude", 0.3, progress=False)  # a mask on every target ...
    with pytest.raises(StateError, match="carries a mask"):  # ... which reconstruct would rewrite under it
        secateurs.prune(model, "sparsegpt", 0.5, calibration=calibration(), progress=False)
    secateurs.unmask(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bias_compensation_after_removal_works_for_any_method_and_can_be_turned_off():
    """FLAP's compensation is a solver of the remove mode: any criterion may use it, and FLAP can drop it."""
    from secateurs.testing import small_mlp

    batches = calibration(shape=(16,), batches=4)
    x = torch.cat([b for b, _ in batches])
    dense = small_mlp()
    with torch.no_grad():
        reference = dense(x).mean(0)
    errors = {}
    for solver in ("none", "bias_compensation"):
        model = small_mlp()
        report = secateurs.prune(model, "magnitude", 0.5, mode="remove", solver=solver, calibration=batches,
                                 structural={"latency": False}, progress=False)  # fmt: skip
        assert report.config["solver"] == solver
        with torch.no_grad():
            errors[solver] = float((model(x).mean(0) - reference).abs().sum())
    assert errors["bias_compensation"] < 0.5 * errors["none"], errors
    assert secateurs.PruneConfig(method="flap", sparsity=0.2, mode="remove", solver="none").solver_ is None


def _dead_input_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first 4 of 16 inputs are always 0, as a ReLU channel that never fires."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 16, generator=g) for _ in range(3)]
    for x in batches:
        x[:, :4] = 0
    return [(x, torch.zeros(8, dtype=torch.long)) for x in batches]


def test_a_fixed_mask_keeps_the_weights_of_inputs_that_never_fired(mlp):
    """The solver reconstructs the mask it is given: inputs dead in calibration get no update, and the weights
    the mask keeps on them stay as they were (they are not zeroed, so the sparsity is exactly the one asked)."""
    dense = mlp[0].weight.detach().clone()
    report = secateurs.prune(mlp, "magnitude", 0.5, mode="reconstruct", solver="sparsegpt", scope=["0"],
                             calibration=_dead_input_batches(), progress=False)  # fmt: skip
    weight = mlp[0].weight.detach()
    assert report.layers[0].sparsity == 0.5 and float((weight == 0).float().mean()) == 0.5
    kept_dead = (weight[:, :4] != 0) & (dense[:, :4] != 0)
    assert kept_dead.any()  # the mask keeps some of them ...
    assert torch.equal(weight[:, :4][kept_dead], dense[:, :4][kept_dead])  # ... unchanged


@pytest.mark.parametrize("sparsity", [0.1, 0.5])
def test_sparsegpt_choosing_its_mask_prunes_exactly_the_sparsity_asked_with_dead_inputs(mlp, sparsity):
    """Dead inputs are pruned first (their saliency is 0); below their share the ones left keep their weights."""
    dense = mlp[0].weight.detach().clone()
    secateurs.prune(mlp, "sparsegpt", sparsity, scope=["0"], calibration=_dead_input_batches(), progress=False)
    weight = mlp[0].weight.detach()
    assert int((weight == 0).sum()) == round(sparsity * weight.numel())
    dead_pruned = int((weight[:, :4] == 0).sum())
    assert dead_pruned == min(round(sparsity * weight.numel()), dense[:, :4].numel())
    assert torch.equal(weight[:, :4][weight[:, :4] != 0], dense[:, :4][weight[:, :4] != 0])


class _TwoConvsOnOneInput(nn.Module):
    """A ResNet-style block: ``conv1`` and the shortcut ``down`` read the same tensor, unfolding it differently."""

    def __init__(self, down: nn.Conv2d):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.down = down
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.fc(self.conv1(x).mean((2, 3)) + self.down(x).mean((2, 3)))


@pytest.mark.parametrize("down", [dict(kernel_size=3, stride=2), dict(kernel_size=1)], ids=["3x3-stride-2", "1x1"])
def test_convs_reading_one_input_but_unfolding_it_differently_keep_their_own_hessians(down):
    """A Hessian is shared only when the rows are: ``down`` is pruned the same with or without ``conv1``."""
    batches = calibration(batches=3)
    pruned = []
    for scope in (["down"], ["conv1", "down"]):
        torch.manual_seed(0)
        model = _TwoConvsOnOneInput(nn.Conv2d(8, 8, **down))
        secateurs.prune(model, "sparsegpt", 0.5, scope=scope, calibration=batches, progress=False)
        pruned.append(model.down.weight.detach().clone())
    assert torch.equal(*pruned)


def test_convs_reading_one_input_still_share_its_channel_statistics():
    from secateurs.evidence import Need, StatsCollector

    torch.manual_seed(0)
    model = _TwoConvsOnOneInput(nn.Conv2d(8, 8, 1))
    targets = [Target(name, getattr(model, name), layout_of(model.conv1)) for name in ("conv1", "down")]
    with StatsCollector(targets, frozenset({Need.ACTIVATIONS, Need.HESSIAN})) as collector:
        for x, _ in calibration(batches=2):
            model(x)
            collector.end_batch()
    activations, hessians = collector.result()
    assert activations["conv1.weight"].inputs is activations["down.weight"].inputs
    assert hessians["conv1.weight"] is not hessians["down.weight"]


def test_a_conv_weight_tied_to_a_strided_conv_is_calibrated_on_each_holders_own_patches():
    """The Hessian of a weight two convs share sums each holder's rows, unfolded as that holder unfolds."""
    from secateurs.evidence import Need, StatsCollector
    from secateurs.hessian import HessianAccumulator
    from secateurs.scope import ScopeSpec, resolve

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.a(x).mean() + self.b(x).mean()

    torch.manual_seed(0)
    model, x = Tied(), torch.randn(2, 4, 7, 7)
    (target,) = resolve(model, ScopeSpec(skip_first=False, skip_last=False))
    with StatsCollector([target], frozenset({Need.HESSIAN})) as collector:
        model(x)
        collector.end_batch()
    expected = HessianAccumulator(36)
    for holder in (model.a, model.b):
        expected.add(hessian_rows(Target("holder", holder, target.layout), x))
    torch.testing.assert_close(collector.result()[1][target.name].hessian, expected.hessian)


def test_a_conv_weight_tied_across_different_groups_is_refused_for_a_hessian():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1, groups=2)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.a(x).mean() + self.b(torch.cat([x, x], 1)).mean()

    with pytest.raises(ConfigError, match=r"groups=1.*'b' \(groups=2\)"):
        secateurs.prune(Tied(), "sparsegpt", 0.5, scope={"skip_first": False, "skip_last": False},
                        calibration=[torch.randn(2, 4, 5, 5)], progress=False)  # fmt: skip
