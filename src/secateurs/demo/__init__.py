"""The demo: small models on scikit-learn's bundled digits (no download needed).

``trained_mlp()`` / ``trained_cnn()`` return trained models for examples, ``held_out_accuracy(model)``
measures them on the 450 held-out images, ``train_batches()`` gives calibration / fine-tuning data.
"""

from __future__ import annotations

from .trained import held_out_accuracy, held_out_batches, train_batches, trained, trained_cnn, trained_mlp

__all__ = ["held_out_accuracy", "held_out_batches", "train_batches", "trained", "trained_cnn", "trained_mlp"]
