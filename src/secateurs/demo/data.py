"""scikit-learn's bundled 8x8 digits (1,797 images) as tensors: offline and fast."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import SecateursError


@dataclass
class Digits:
    x_train: Tensor  # (N, 1, 8, 8), scaled to [0, 1]
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def batches(self, batch_size: int = 64, seed: int = 0, train: bool = True) -> list[tuple[Tensor, Tensor]]:
        """One epoch of shuffled (train) or ordered (test) batches."""
        x, y = (self.x_train, self.y_train) if train else (self.x_test, self.y_test)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if train else torch.arange(len(x))
        return [(x[order[i : i + batch_size]], y[order[i : i + batch_size]]) for i in range(0, len(x), batch_size)]


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Digits:
    """Stratified split, deterministic under ``seed``."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise SecateursError("the demo needs scikit-learn: pip install 'secateurs[demo]'") from exc
    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        range(len(y)), test_size=test_fraction, random_state=seed, stratify=data.target
    )
    return Digits(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def calibration_batches() -> list[tuple[Tensor, Tensor]]:
    """For ``secateurs prune --data secateurs.demo.data:calibration_batches``."""
    return load_digits().batches(64)[:4]
