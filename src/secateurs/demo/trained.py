"""Trained demo models, for examples that should show pruning working rather than breaking a random net.

``trained_mlp()`` and ``trained_cnn()`` train the demo's models on scikit-learn's bundled digits
(offline, deterministic for a seed, a few seconds on one CPU thread) and return a fresh copy each
call; the training runs once per process. As ``module:function`` they work on the command line:
``secateurs prune secateurs.demo:trained_mlp --method magnitude --sparsity 0.9 ...``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..threads import limited_threads
from ..training import accuracy, train
from .data import Digits, load_digits
from .models import digits_cnn, digits_mlp

#: optimizer steps of Adam (lr 1e-3, batches of 64): enough for ~97% (MLP) and ~99.5% (CNN) test accuracy
STEPS = 300


@functools.cache
def digits(seed: int = 0) -> Digits:
    """The digits, split into 1,347 training and 450 held-out images under ``seed`` (loaded once)."""
    return load_digits(seed=seed)


def train_batches(batch_size: int = 64, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """One shuffled epoch of ``(images, labels)`` training batches (images ``(N, 1, 8, 8)``)."""
    return digits(seed).batches(batch_size, seed)


def held_out_batches(batch_size: int = 256, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """The 450 held-out images (one image is 0.22 accuracy points), in order."""
    return digits(seed).batches(batch_size, train=False)


def held_out_accuracy(model: nn.Module, seed: int = 0) -> float:
    """Top-1 accuracy on the held-out digits."""
    return accuracy(model, held_out_batches(seed=seed))


def trained(factory: Callable[[], nn.Module], steps: int = STEPS, seed: int = 0) -> nn.Module:
    """``factory()`` initialised under ``seed`` and trained for ``steps`` on the digits (one thread:
    8x8 images are too small for threads to pay, and a fixed count keeps the result reproducible)."""
    torch.manual_seed(seed)
    model = factory()
    with limited_threads(1):
        train(model, train_batches(64, seed), steps)
    return model.eval()


@functools.cache
def _trained_state(name: str, steps: int, seed: int) -> dict[str, Tensor]:
    factory = {"mlp": digits_mlp, "cnn": digits_cnn}[name]
    return {k: v.clone() for k, v in trained(factory, steps, seed).state_dict().items()}


def _fresh(name: str, factory: Callable[[], nn.Module], steps: int, seed: int) -> nn.Module:
    model = factory()
    model.load_state_dict(_trained_state(name, steps, seed))
    return model.eval()


def trained_mlp(steps: int = STEPS, seed: int = 0) -> nn.Sequential:
    """LeNet-300-100 (:func:`~secateurs.demo.models.digits_mlp`) trained on the digits; a fresh copy."""
    return _fresh("mlp", digits_mlp, steps, seed)


def trained_cnn(steps: int = STEPS, seed: int = 0) -> nn.Sequential:
    """The small VGG-style CNN (:func:`~secateurs.demo.models.digits_cnn`) trained on the digits; a fresh copy."""
    return _fresh("cnn", digits_cnn, steps, seed)
