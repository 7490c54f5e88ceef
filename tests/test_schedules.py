"""Schedules give the papers' sparsity curves; Pruner drives them from a training loop."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from secateurs import (
    ConfigError,
    Cubic,
    Exponential,
    Linear,
    LotteryTicket,
    OneShot,
    Pruner,
    SecateursWarning,
    StateError,
)
from secateurs.schedules import make_schedule


def test_cubic_follows_zhu_and_gupta_equation_one():
    schedule = Cubic(start=10, end=50, every=10, initial=0.1)
    values = [schedule.sparsity_at(t, 0.9) for t in range(0, 61)]
    pruning_steps = [t for t, v in enumerate(values) if v is not None]
    assert pruning_steps == [10, 20, 30, 40, 50]
    for t in pruning_steps:
        expected = 0.9 + (0.1 - 0.9) * (1 - (t - 10) / 40) ** 3
        assert values[t] == pytest.approx(expected)
    assert values[50] == pytest.approx(0.9)


def test_linear_and_exponential_and_oneshot():
    assert [Linear(0, 4, 2).sparsity_at(t, 0.8) for t in range(5)] == [0.0, None, 0.4, None, 0.8]
    exp = Exponential(iterations=4)
    densities = [1 - exp.sparsity_at(t, 0.99) for t in range(4)]
    assert densities == pytest.approx([0.01 ** (k / 4) for k in range(1, 5)])
    assert [OneShot(at=2).sparsity_at(t, 0.5) for t in range(4)] == [None, None, 0.5, None]


def test_lottery_prunes_at_the_end_of_each_round_by_a_constant_factor():
    schedule = LotteryTicket(rounds=3, steps_per_round=5)
    events = {t: schedule.sparsity_at(t, 0.936) for t in range(25) if schedule.sparsity_at(t, 0.936) is not None}
    assert list(events) == [4, 9, 14]
    assert [1 - s for s in events.values()] == pytest.approx([0.4, 0.16, 0.064])


@pytest.mark.parametrize(
    "spec",
    [{"kind": "cubic", "start": 0, "end": 10, "every": 3}, {"kind": "warp"}, {"kind": "linear", "start": 0, "stop": 1},
     {"kind": "lottery", "rounds": 2, "steps_per_round": 5, "rewind_to": 5}, "sometimes"],
)  # fmt: skip
def test_bad_schedules_are_refused(spec):
    with pytest.raises(ConfigError):
        make_schedule(spec)


def _train(model, pruner, batches, steps):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    events = []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        event = pruner.step()
        events.append(event)
        if event.rewound:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return events


def test_pruner_on_a_cubic_schedule_reaches_the_final_sparsity(mlp, mlp_batches):
    pruner = Pruner(mlp, "magnitude", 0.8, allocation="global", schedule=Cubic(start=2, end=8, every=2))
    events = _train(mlp, pruner, mlp_batches, 12)
    assert [e.step for e in events if e.pruned] == [2, 4, 6, 8]
    sparsities = [e.sparsity for e in events if e.pruned]
    assert sparsities == sorted(sparsities) and sparsities[-1] == pytest.approx(0.8)
    assert pruner.report().sparsity == pytest.approx(0.8, abs=1e-3)


def test_lottery_ticket_rewinds_surviving_weights_to_initialisation(mlp, mlp_batches):
    init = {k: v.clone() for k, v in mlp.state_dict().items()}
    pruner = Pruner(mlp, "magnitude", 0.75, allocation="global", schedule=LotteryTicket(rounds=2, steps_per_round=3))
    events = _train(mlp, pruner, mlp_batches, 3)
    assert events[-1].rewound and events[-1].sparsity == pytest.approx(0.5)
    for name in ("0", "2"):
        module = mlp.get_submodule(name)
        assert torch.equal(module.parametrizations.weight.original, init[f"{name}.weight"])
        assert torch.equal(module.bias, init[f"{name}.bias"])
    events += _train(mlp, pruner, mlp_batches, 6)
    assert [e.step for e in events if e.rewound] == [2, 5]
    assert pruner.report().sparsity == pytest.approx(0.75, abs=1e-3)


def test_lottery_ticket_can_rewind_to_an_early_step(mlp, mlp_batches):
    pruner = Pruner(mlp, "magnitude", 0.5, schedule=LotteryTicket(rounds=1, steps_per_round=4, rewind_to=2))
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.1)
    snapshot = None
    for step in range(4):
        x, y = mlp_batches[step % 3]
        optimizer.zero_grad()
        F.cross_entropy(mlp(x), y).backward()
        optimizer.step()
        if step == 1:
            snapshot = mlp[2].bias.detach().clone()
        pruner.step()
    assert torch.equal(mlp[2].bias, snapshot)


def test_pruner_state_round_trips_and_refuses_a_different_config(mlp, mlp_batches):
    pruner = Pruner(mlp, "magnitude", 0.5, schedule=Linear(0, 4, 2))
    _train(mlp, pruner, mlp_batches, 3)
    state = pruner.state_dict()
    again = Pruner(mlp, "magnitude", 0.5, schedule=Linear(0, 4, 2))
    again.load_state_dict(state)
    assert again.step_count == 3 and again.current_sparsity == pytest.approx(0.25)
    with pytest.raises(StateError, match="different configuration"):
        Pruner(mlp, "magnitude", 0.6, schedule=Linear(0, 4, 2)).load_state_dict(state)


def test_finalize_bakes_when_asked(mlp, mlp_batches):
    keys = list(mlp.state_dict())
    pruner = Pruner(mlp, "magnitude", 0.5, mode="bake")
    _train(mlp, pruner, mlp_batches, 1)
    pruner.finalize()
    assert list(mlp.state_dict()) == keys
    assert (mlp[0].weight == 0).float().mean() == pytest.approx(0.5)


def test_finalize_before_the_schedule_ends_warns_with_the_sparsity_reached(mlp, mlp_batches):
    pruner = Pruner(mlp, "magnitude", 0.9, schedule=Cubic(start=0, end=8, every=2))
    _train(mlp, pruner, mlp_batches, 3)  # pruned at steps 0 and 2 only
    reached = pruner.current_sparsity
    with pytest.warns(SecateursWarning, match=rf"keeps sparsity {reached:.2%}, not the final 90\.00%.*to_final=True"):
        pruner.finalize(bake=True)
    assert pruner.report().sparsity == pytest.approx(reached, abs=1e-3)


def test_finalize_to_final_prunes_to_the_final_sparsity_first(mlp, mlp_batches):
    pruner = Pruner(mlp, "magnitude", 0.9, schedule=Cubic(start=0, end=8, every=2))
    _train(mlp, pruner, mlp_batches, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # jumping to the end is what was asked: no warning
        pruner.finalize(to_final=True)
    assert pruner.report().sparsity == pytest.approx(0.9, abs=1e-3)


def test_finalize_after_the_schedule_ends_is_silent(mlp, mlp_batches):
    pruner = Pruner(mlp, "magnitude", 0.8, schedule=Linear(0, 4, 2))
    _train(mlp, pruner, mlp_batches, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner.finalize()


def test_a_misspelled_pruner_keyword_names_itself_and_the_valid_ones(mlp):
    with pytest.raises(ConfigError, match=r"Pruner\(\) got unknown keyword\(s\) 'shedule' \(did you mean 'schedule'"):
        Pruner(mlp, "magnitude", 0.5, shedule=Linear(0, 4, 2))
