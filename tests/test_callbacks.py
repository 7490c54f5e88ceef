"""A Pruner rides along a Hugging Face Trainer run through its callback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs import Cubic, LotteryTicket, Pruner, SecateursError
from secateurs.training.callbacks import hf_trainer_callback

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x, labels=None):
        logits = self.body(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _train(model, callback, steps, tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=16, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[callback])
    trainer.train()


def test_gradual_pruning_inside_a_trainer_reaches_the_target(tmp_path):
    model = Classifier()
    pruner = Pruner(model, "magnitude", 0.8, allocation="global", schedule=Cubic(start=0, end=8, every=2))
    callback = hf_trainer_callback(pruner)
    _train(model, callback, 10, tmp_path)
    assert [e.step for e in callback.events] == [0, 2, 4, 6, 8]
    assert pruner.report().sparsity == pytest.approx(0.8, abs=1e-3)


def test_lottery_rewind_inside_a_trainer_restores_init_and_keeps_zeros(tmp_path):
    model = Classifier()
    init = model.body[2].bias.detach().clone()
    pruner = Pruner(model, "magnitude", 0.5, schedule=LotteryTicket(rounds=1, steps_per_round=4))
    callback = hf_trainer_callback(pruner)
    _train(model, callback, 4, tmp_path)
    assert callback.events[-1].rewound
    assert torch.equal(model.body[2].bias, init)
    assert pruner.report().sparsity == pytest.approx(0.5, abs=1e-3)


def test_a_removal_pruner_is_refused_by_the_trainer_callback():
    """The Trainer's optimizer would keep stepping the replaced (old-shape) parameters."""
    pruner = Pruner(Classifier(), "magnitude", 0.5, mode="remove", example_inputs=torch.zeros(1, 8),
                    schedule={"kind": "linear", "start": 0, "end": 10, "every": 5})  # fmt: skip
    with pytest.raises(SecateursError, match=r"mode='mask', then secateurs.bake\(model\)"):
        hf_trainer_callback(pruner)


def test_a_regularizer_rides_a_trainer_run_between_backward_and_the_optimizer_step(tmp_path):
    model = Classifier()
    pruner = Pruner(model, regularizer="group_lasso", example_inputs=torch.randn(2, 8),
                    regularizer_options={"strength": 1.0, "proximal_lr": 0.1})  # fmt: skip
    callback = hf_trainer_callback(pruner)
    _train(model, callback, 12, tmp_path)
    assert len(callback.penalties) == 12 and callback.penalties[0] > 0
    assert pruner.step_count == 12 and pruner.config.regularizer_.step == 12
    assert callback.penalties[-1] < callback.penalties[0]  # the proximal step shrinks every group
    assert pruner.regularization_report().zero > 0
