"""Each method does, on a real (small) run, what its paper says it does.

Trained and pruned on scikit-learn's digits; numbers are deterministic under the
seeds used here. `bench/criteria_digits.py` prints the full table over several seeds.
"""

from __future__ import annotations

import copy

import pytest
import torch

from secateurs import prune
from secateurs.demo.data import load_digits
from secateurs.demo.models import digits_cnn, digits_mlp
from secateurs.training import accuracy, train

EVERY_LAYER = {"skip_first": False, "skip_last": False}


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return data, data.batches(64, 0), data.batches(512, train=False)


@pytest.fixture(scope="module")
def trained_mlp(digits):
    _, batches, _ = digits
    torch.manual_seed(0)
    model = digits_mlp()
    train(model, batches, 300)
    return model


def _pruned_accuracy(model, digits, method, sparsity, **options):
    _, batches, test = digits
    pruned = copy.deepcopy(model)
    prune(pruned, method, sparsity, calibration=batches[:4], progress=False, **options)
    return accuracy(pruned, test)


def test_post_training_criteria_beat_random_pruning(trained_mlp, digits):
    """Magnitude (Han et al. 2015), LAMP, OBD and Wanda keep far more accuracy than removing the
    same number of weights at random, in one shot and without fine-tuning. (First-order Taylor and
    gradient scores vanish on a converged network and are not one-shot criteria; Taylor's paper
    setting, filter pruning, is tested below.)"""
    random = _pruned_accuracy(trained_mlp, digits, "random", 0.8)
    assert accuracy(trained_mlp, digits[2]) > 0.95
    margins = {m: _pruned_accuracy(trained_mlp, digits, m, 0.8) - random
               for m in ("magnitude", "lamp", "obd", "wanda")}  # fmt: skip
    assert all(margin > 0.15 for margin in margins.values()), margins
    assert margins["magnitude"] > 0.4 and margins["lamp"] > 0.4


def test_lamp_beats_global_magnitude_at_extreme_sparsity(trained_mlp, digits):
    """Lee et al. 2021: LAMP's layer-adaptive budgets outperform one global magnitude threshold."""
    lamp = _pruned_accuracy(trained_mlp, digits, "lamp", 0.95, scope=EVERY_LAYER)
    global_magnitude = _pruned_accuracy(trained_mlp, digits, "magnitude", 0.95, allocation="global",
                                        scope=EVERY_LAYER)  # fmt: skip
    assert lamp > global_magnitude + 0.1


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow"])
def test_pruning_at_initialisation_beats_random_masks_after_training(digits, method):
    """SNIP, GraSP and SynFlow masks chosen before training train to far better accuracy than
    random masks of the same sparsity; global magnitude at init collapses (Tanaka et al. 2020)."""
    data, batches, test = digits

    def trained(m, **options):
        torch.manual_seed(0)
        model = digits_mlp()
        prune(model, m, 0.95, allocation="global", scope=EVERY_LAYER, calibration=batches[:4],
              example_inputs=data.x_test[:1], progress=False, **options)  # fmt: skip
        train(model, batches, 300)
        return accuracy(model, test)

    assert trained(method) > trained("random") + 0.2


def test_neuron_criteria_keep_more_than_random_neurons(digits):
    """Removing 30% of CNN filters by activation, APoZ (Hu et al. 2016) or L1 norm (Li et al.
    2017) hurts less than removing random filters."""
    _, batches, _ = digits
    torch.manual_seed(0)
    model = digits_cnn()
    train(model, batches, 300)
    scores = {m: _pruned_accuracy(model, digits, m, 0.3, pattern="output_channel")
              for m in ("random", "activation", "apoz", "magnitude")}  # fmt: skip
    assert all(scores[m] > scores["random"] + 0.02 for m in scores if m != "random"), scores


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.argsort().argsort().double(), b.argsort().argsort().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_taylor_ranks_filters_like_the_oracle_loss_change(digits):
    """Molchanov et al. 2017 (arXiv:1611.06440, table 1): the Taylor criterion correlates with
    the oracle ranking (the loss change from actually removing each filter) far better than
    weight magnitude or chance."""
    import torch.nn.functional as F

    from secateurs.config import PruneConfig
    from secateurs.pipeline import Context, Data, score_targets, select
    from secateurs.scope import resolve

    _, batches, _ = digits
    torch.manual_seed(0)
    model = digits_cnn()
    train(model, batches, 300)
    model.eval()
    calibration = batches[:8]
    conv = model.conv2

    @torch.no_grad()
    def loss() -> float:
        return sum(float(F.cross_entropy(model(x), y)) for x, y in calibration)

    base = loss()
    oracle = torch.zeros(conv.out_channels)
    for filter_ in range(conv.out_channels):
        saved = conv.weight.data[filter_].clone()
        conv.weight.data[filter_] = 0
        oracle[filter_] = abs(loss() - base)
        conv.weight.data[filter_] = saved

    def filter_scores(method: str) -> torch.Tensor:
        config = PruneConfig(method=method, sparsity=0.5, pattern="output_channel", scope=["conv2"])
        targets = resolve(model, config.scope_)
        scores = score_targets(model, targets, config, Data(calibration, show_progress=False))
        keep = select(config.plans(targets)[0], targets, scores, 0.5, Context())[0]["conv2.weight"]
        assert keep.any(dim=(1, 2, 3)).sum() == 32  # and selection keeps the top half
        if config.criterion_.signed:
            return torch.stack([(b.sum(dim=(1, 2))).abs() for b in scores["conv2.weight"]]).mean(0)
        return scores["conv2.weight"].sum(dim=(1, 2))

    taylor = _spearman(filter_scores("taylor"), oracle)
    assert taylor > 0.6
    assert taylor > _spearman(filter_scores("magnitude"), oracle) + 0.3
    assert taylor > _spearman(filter_scores("random"), oracle) + 0.3
