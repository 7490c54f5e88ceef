"""A Pruner and its regularizer ride along a PyTorch Lightning run (optional extra ``lightning``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateurs import Pruner, SecateursError
from secateurs.training import lightning_callback

pl = pytest.importorskip("lightning.pytorch")


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _fit(module, callback, steps):
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])  # fmt: skip
    trainer.fit(module, _loader())


def test_network_slimming_inside_a_lightning_run_zeroes_batchnorm_scales():
    module = Module()
    pruner = Pruner(module.body, regularizer="bn_l1", regularizer_options={"strength": 1.0, "proximal_lr": 0.1})
    callback = lightning_callback(pruner)
    _fit(module, callback, 20)
    assert len(callback.penalties) == 20 and pruner.step_count == 20
    report = pruner.regularization_report()
    assert report.zero > 0 and report.zero == int((module.body[1].weight == 0).sum())


def test_gradual_pruning_inside_a_lightning_run_reaches_the_target():
    module = Module()
    pruner = Pruner(module.body, "magnitude", 0.5, schedule={"kind": "cubic", "start": 0, "end": 6, "every": 2})
    callback = lightning_callback(pruner)
    _fit(module, callback, 8)
    assert [e.step for e in callback.events] == [0, 2, 4, 6]
    assert pruner.report().sparsity == pytest.approx(0.5, abs=1e-2)


def test_the_lightning_callback_refuses_removal_during_training():
    pruner = Pruner(Module().body, "magnitude", 0.5, mode="remove", example_inputs=torch.randn(2, 8))
    with pytest.raises(SecateursError, match="remove_zero_groups"):
        lightning_callback(pruner)


class ConvModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
        )  # fmt: skip

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.body(x.view(-1, 1, 2, 4)), y)

    def configure_optimizers(self):  # built by fit(), after the Pruner added the predictors
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fbs_gates_train_inside_a_lightning_run():
    module = ConvModule()
    pruner = Pruner(module.body, regularizer="fbs", regularizer_options={"strength": 0.05})
    before = module.body[2].saliency.weight.detach().clone()
    callback = lightning_callback(pruner)
    _fit(module, callback, 6)
    assert len(callback.penalties) == 6 and all(p > 0 for p in callback.penalties)
    assert not torch.equal(before, module.body[2].saliency.weight)
