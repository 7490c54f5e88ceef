"""Masks are parametrizations that nothing can undo by accident; bake leaves original keys."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import assert_unchanged, fingerprint, small_cnn, small_mlp
from secateurs import StateError, bake, load_masks, prune, save_masks, unmask
from secateurs.io import OutputExistsError
from secateurs.masking import masked_targets


def _masked(model):
    return {t.name: t.weight.detach() == 0 for t in masked_targets(model)}


def test_deepcopy_of_a_masked_model_keeps_masks_and_outputs(mlp):
    prune(mlp, "magnitude", 0.5)
    clone = copy.deepcopy(mlp)
    x = torch.randn(4, 16)
    assert torch.equal(clone(x), mlp(x))
    assert _masked(clone).keys() == _masked(mlp).keys()


def test_masked_weight_stays_the_same_parameter_object(mlp):
    before = mlp[0].weight
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.1)
    prune(mlp, "magnitude", 0.5)
    assert mlp[0].parametrizations.weight.original is before
    assert any(p is before for group in optimizer.param_groups for p in group["params"])


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.5),
    ],
)
def test_pruned_entries_stay_zero_after_optimizer_steps(mlp, mlp_batches, make_optimizer):
    optimizer = make_optimizer(mlp.parameters())
    # build up optimizer state (momentum) on the dense weights first
    for x, y in mlp_batches:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(mlp(x), y).backward()
        optimizer.step()
    prune(mlp, "magnitude", 0.7, allocation="global")
    zeros = _masked(mlp)
    for _ in range(5):
        for x, y in mlp_batches:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(mlp(x), y).backward()
            optimizer.step()
    for t in masked_targets(mlp):
        assert (t.weight.detach()[zeros[t.name]] == 0).all(), t.name


def test_pruned_entries_get_exactly_zero_gradient(mlp, mlp_batches):
    prune(mlp, "magnitude", 0.5)
    x, y = mlp_batches[0]
    torch.nn.functional.cross_entropy(mlp(x), y).backward()
    for t in masked_targets(mlp):
        mask = t.module.parametrizations.weight[0].mask
        assert (t.parameter.grad[~mask] == 0).all()
        assert (t.parameter.grad[mask] != 0).any()


def test_repruning_only_removes_what_is_still_alive(mlp):
    prune(mlp, "magnitude", 0.5)
    first = _masked(mlp)
    # make the pruned originals large: magnitude of the *effective* weight still ranks them dead
    with torch.no_grad():
        for t in masked_targets(mlp):
            t.parameter[first[t.name]] = 100.0
    report = prune(mlp, "magnitude", 0.8)
    for t in masked_targets(mlp):
        assert (t.weight.detach()[first[t.name]] == 0).all()
    assert report.sparsity == pytest.approx(0.8, abs=1e-3)


def test_baked_state_dict_loads_strictly_into_the_unpruned_class(cnn):
    keys = list(cnn.state_dict())
    prune(cnn, "magnitude", 0.6, mode="bake")
    assert list(cnn.state_dict()) == keys
    fresh = small_cnn()
    fresh.load_state_dict(cnn.state_dict(), strict=True)
    x = torch.randn(2, 3, 6, 6)
    cnn.eval(), fresh.eval()
    assert torch.equal(fresh(x), cnn(x))


def test_bake_after_mask_keeps_original_keys_and_zeros(mlp):
    keys = list(mlp.state_dict())
    prune(mlp, "magnitude", 0.5)
    assert list(mlp.state_dict()) != keys
    zeros = _masked(mlp)
    assert bake(mlp) == 2
    assert list(mlp.state_dict()) == keys
    assert (mlp[0].weight[zeros["0.weight"]] == 0).all()
    assert not masked_targets(mlp)


@pytest.mark.parametrize("mode", ["mask", "bake"])
def test_pruned_entries_are_positive_zeros(mlp, mode):
    """Not ``w * 0``: a -0.0 has bits set, so a compressed checkpoint would have to store it."""
    prune(mlp, "magnitude", 0.5, mode=mode)
    weight = mlp[0].weight.detach()
    assert (weight == 0).sum() > 0 and not torch.signbit(weight[weight == 0]).any()


def test_unmask_restores_the_dense_weights(mlp):
    before = fingerprint(mlp)
    prune(mlp, "magnitude", 0.5)
    assert unmask(mlp) == 2
    assert_unchanged(mlp, before)


def test_masks_round_trip_through_safetensors(mlp, tmp_path):
    prune(mlp, "random", 0.6, seed=3)
    expected = _masked(mlp)
    path = save_masks(mlp, tmp_path / "masks.safetensors")
    fresh = small_mlp()
    assert sorted(load_masks(fresh, path)) == sorted(expected)
    assert {k: torch.equal(v, expected[k]) for k, v in _masked(fresh).items()} == dict.fromkeys(expected, True)


def test_save_masks_refuses_to_overwrite_without_permission(mlp, tmp_path):
    prune(mlp, "magnitude", 0.5)
    path = save_masks(mlp, tmp_path / "m.safetensors")
    with pytest.raises(OutputExistsError, match="overwrite"):
        save_masks(mlp, path)
    save_masks(mlp, path, overwrite=True)


def test_load_masks_with_wrong_shapes_touches_nothing(mlp, tmp_path):
    other = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 4))  # fmt: skip
    prune(other, "magnitude", 0.5)
    path = save_masks(other, tmp_path / "m.safetensors")
    before = fingerprint(mlp)
    with pytest.raises(StateError, match=r"2\.weight.*shape"):
        load_masks(mlp, path)
    assert_unchanged(mlp, before)


def test_save_masks_on_an_unmasked_model_is_an_error(mlp, tmp_path):
    with pytest.raises(StateError, match="no secateurs masks"):
        save_masks(mlp, tmp_path / "m.safetensors")


def test_bake_refuses_a_mask_that_sits_behind_a_user_parametrization_and_writes_nothing():
    """weight = mask(P(original)): zeros written into ``original`` would pass through P and not stay zero."""
    from torch import nn
    from torch.nn.utils import parametrize

    import secateurs

    class Scale(nn.Module):
        def forward(self, w):
            return 2 * w + 1  # not zero-preserving: a zero written into the original becomes 1

    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    model = nn.Sequential(first, nn.ReLU(), second)
    parametrize.register_parametrization(second, "weight", Scale())
    secateurs.prune(model, "magnitude", 0.5, scope={"skip_first": False, "skip_last": False}, progress=False)
    originals = [first.parametrizations.weight.original.clone(), second.parametrizations.weight.original.clone()]
    with pytest.raises(secateurs.StateError, match=r"2.weight is parametrized by Scale before its mask"):
        secateurs.bake(model)
    assert torch.equal(first.parametrizations.weight.original, originals[0])  # nothing baked, not even the first
    assert torch.equal(second.parametrizations.weight.original, originals[1])
