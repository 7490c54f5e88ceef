"""A method registered from outside the package runs, unchanged, through every mode and runner.

The toy criterion below lives in this test file only. It needs activations, so both runners must
gather for it: the whole-model runner over calibration batches (mask, bake, reconstruct, remove on
a CNN) and the block runner over a tiny Llama's blocks.
"""

from __future__ import annotations

import pytest
import torch

import secateurs
from secateurs import ConfigError, Criterion
from secateurs.criteria import CRITERIA
from secateurs.criteria.activation import input_norm3
from secateurs.criteria.base import weight3
from secateurs.evidence import Need
from secateurs.testing import calibration, check_criterion, small_cnn

pytest.importorskip("transformers")


class CubedWanda(Criterion):
    """|w|^3 * ||x||: a toy that is not any built-in method."""

    name = "toy_cubed_wanda"
    needs = frozenset({Need.ACTIVATIONS})

    def __init__(self, power: float = 3.0) -> None:
        self.power = power

    def score(self, target, evidence):
        return weight3(target).abs().double() ** self.power * input_norm3(evidence, target)


@pytest.fixture
def toy():
    secateurs.register(CubedWanda)
    yield CubedWanda
    CRITERIA.unregister(CubedWanda.name)


def test_a_criterion_registered_outside_runs_in_every_mode_and_runner(toy):
    passed = check_criterion("toy_cubed_wanda", {"power": 2.0})
    assert [p.split(":")[0] for p in passed] == [
        "scores", "mode='mask'", "mode='bake'", "mode='reconstruct'", "mode='remove'",
        "runner='blocks' (tiny Llama, mode='bake')",
    ]  # fmt: skip
    assert "toy_cubed_wanda" in {m.name for m in secateurs.methods("criterion")}


def test_the_toy_scores_are_what_it_says(toy):
    """The runner fed the toy the same evidence Wanda gets: its masks are Wanda's when the power is 1."""
    a, b = small_cnn(), small_cnn()
    secateurs.prune(a, "toy_cubed_wanda", 0.5, method_options={"power": 1.0}, comparison="row",
                    calibration=calibration(), progress=False)  # fmt: skip
    secateurs.prune(b, "wanda", 0.5, calibration=calibration(), progress=False)
    masks = {k: v for k, v in a.state_dict().items() if k.endswith("mask")}
    assert masks and all(torch.equal(v, b.state_dict()[k]) for k, v in masks.items())


def test_the_conformance_check_catches_a_criterion_that_breaks_a_promise():
    class StoredLayout(Criterion):
        name = "toy_stored_layout"

        def score(self, target, evidence):
            return target.weight.detach().abs()  # the stored (out, in, kh, kw) layout, not the canonical one

    secateurs.register(StoredLayout)
    try:
        with pytest.raises(AssertionError, match=r"scores of 3.weight are \(16, 8, 3, 3\), expected \(16, 9, 8\)"):
            check_criterion("toy_stored_layout")
    finally:
        CRITERIA.unregister(StoredLayout.name)


def test_a_name_taken_by_another_criterion_is_refused():
    class Impostor(Criterion):
        name = "wanda"

    with pytest.raises(ConfigError, match="already registered"):
        secateurs.register(Impostor)
    assert CRITERIA.get("wanda").__name__ == "Wanda"


@pytest.mark.parametrize(
    "method", sorted(n for n in CRITERIA.names() if not n.startswith("toy_") and not CRITERIA.get(n).from_training)
)
def test_every_built_in_criterion_passes_the_conformance_checks(method):
    assert check_criterion(method)
