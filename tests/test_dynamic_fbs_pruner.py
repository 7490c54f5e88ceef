"""FBS trained through the Pruner's drivers (regularizer='fbs'): the lasso's gradient enters during the
loss's backward, equal to adding FBS.penalty() to the loss; the plain loop and both callbacks train it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateurs import Pruner
from secateurs.dynamic import FBSConv, add_fbs
from secateurs.errors import ConfigError, NonFiniteError, StateError
from secateurs.training import FBSLasso, train


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
    ).train()  # fmt: skip


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return x, (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0).long()


def test_the_pruner_gates_the_convolutions_in_scope_but_the_first():
    model = _cnn()
    pruner = Pruner(model, regularizer="fbs", regularizer_options={"density": 0.5, "strength": 1e-3})
    gated = [name for name, m in model.named_modules() if isinstance(m, FBSConv)]
    assert gated == ["3", "7"]
    assert all(m.lasso == 1e-3 for m in model.modules() if isinstance(m, FBSConv))
    assert isinstance(pruner.config.regularizer_, FBSLasso)


def test_the_lasso_gradient_equals_adding_the_penalty_to_the_loss():
    model = _cnn()
    pruner = Pruner(model, regularizer="fbs", regularizer_options={"density": 0.5, "strength": 0.1})
    reference = _cnn()
    fbs = add_fbs(reference, 0.5)
    reference.load_state_dict(model.state_dict())
    x, y = _data(8)
    F.cross_entropy(model(x), y).backward()
    value = pruner.regularize()
    (F.cross_entropy(reference(x), y) + fbs.penalty(0.1)).backward()
    assert value == pytest.approx(float(fbs.penalty(0.1).detach()), rel=1e-6)
    assert value > 0
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    # without the lasso, the predictors' gradients differ: the test can fail
    plain = copy.deepcopy(reference)  # also: a model gated and run in training copies
    plain.zero_grad()
    F.cross_entropy(plain(x), y).backward()
    assert not torch.allclose(plain[3].saliency.weight.grad, model[3].saliency.weight.grad)


def test_the_strength_schedule_reaches_the_gates():
    model = _cnn()
    schedule = {"kind": "linear", "start": 0, "end": 4}
    pruner = Pruner(model, regularizer="fbs", regularizer_options={"strength": 1.0, "strength_schedule": schedule})
    x, y = _data(8)
    seen = []
    for _ in range(5):
        seen.append(model[3].lasso)
        F.cross_entropy(model(x), y).backward()
        pruner.regularize()
        model.zero_grad()
        pruner.step()
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_the_plain_loop_trains_the_predictors_and_the_lasso_shrinks_saliencies():
    x, y = _data()
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    mean_saliency = {}
    for strength in (0.0, 0.2):
        model = _cnn()
        pruner = Pruner(model, regularizer="fbs", regularizer_options={"density": 0.5, "strength": strength})
        before = model[7].saliency.weight.detach().clone()
        train(model, batches, 20, pruner=pruner)
        assert not torch.equal(before, model[7].saliency.weight)
        mean_saliency[strength] = float(sum(n.mean() for n in pruner.config.regularizer_.group_norms().values()))
        model.eval()
        with torch.no_grad():
            assert model(x[:1]).shape == (1, 3)  # the one-sample path still runs
    assert mean_saliency[0.2] < 0.9 * mean_saliency[0.0]


def test_a_scope_without_convolutions_is_refused_and_the_model_is_unchanged():
    model = _cnn()
    before = copy.deepcopy(model)
    with pytest.raises(ConfigError, match="scope selects none"):
        Pruner(model, regularizer="fbs", scope={"include": ["11"], "skip_last": False})
    assert str(model) == str(before)


def test_non_finite_saliencies_stop_with_the_layer_named():
    model = _cnn()
    pruner = Pruner(model, regularizer="fbs", regularizer_options={"strength": 1e-3})
    with pytest.raises(StateError, match="no training forward"):
        pruner.regularize()
    x, y = _data(4)
    x[0, 0, 0, 0] = float("nan")
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(NonFiniteError, match=r"3\.saliency"):
        pruner.regularize()


def test_bad_density_is_refused():
    with pytest.raises(ConfigError, match="density"):
        Pruner(_cnn(), regularizer="fbs", regularizer_options={"density": 0.0})


def test_fbs_rides_along_a_trainer_run(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from secateurs.training import hf_trainer_callback

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _cnn()

        def forward(self, x, labels=None):
            logits = self.body(x)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    class Data(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.x, self.y = _data()

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    model = Wrapped()
    pruner = Pruner(model, regularizer="fbs", regularizer_options={"strength": 0.05})
    before = model.body[7].saliency.weight.detach().clone()
    callback = hf_trainer_callback(pruner)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=16, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[callback]).train()
    assert len(callback.penalties) == 6 and all(p > 0 for p in callback.penalties)
    assert not torch.equal(before, model.body[7].saliency.weight)


def test_a_scoped_pruner_gated_model_saves_and_loads(tmp_path):
    model = _cnn()
    pruner = Pruner(model, regularizer="fbs", regularizer_options={"density": 0.5}, scope={"include": ["7"]})
    fbs = pruner.config.regularizer_.fbs
    assert list(fbs.layers) == ["7"]
    x, y = _data(8)
    train(model, [(x, y)], 2, pruner=pruner)
    fbs.save(tmp_path / "gated.safetensors")
    from secateurs.dynamic import load_fbs

    restored = load_fbs(_cnn(), tmp_path / "gated.safetensors").model.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))


def test_gates_of_another_density_and_pruning_alongside_are_refused():
    model = _cnn()
    add_fbs(model, 0.25)
    with pytest.raises(ConfigError, match="already gated by FBS at density"):
        Pruner(model, regularizer="fbs", regularizer_options={"density": 0.5})
    fresh = _cnn()
    before = str(fresh)
    with pytest.raises(ConfigError, match="cannot also prune"):
        Pruner(fresh, "magnitude", 0.5, regularizer="fbs")
    assert str(fresh) == before
