"""Plots of a sensitivity profile: per-target curves (metric against sparsity) and a target x sparsity
heatmap of the damage, written as PNG with matplotlib's non-interactive backend (the ``plot`` extra)."""

from __future__ import annotations

import os
from pathlib import Path

from ..plotting import pyplot, save_png
from .profile import SensitivityProfile


def plot_curves(profile: SensitivityProfile, path: str | os.PathLike, top: int = 12, overwrite: bool = False) -> Path:
    """The metric against sparsity for the ``top`` most sensitive targets (dense at 0), one line each."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for entry, _ in profile.ranked()[:top]:
        xs, ys = zip(*profile.curve(entry.name))
        ax.plot(xs, ys, marker="o", markersize=3, label=entry.name)
    ax.set_xlabel("sparsity of the target alone")
    ax.set_ylabel(profile.metric)
    method = profile.settings.get("method", "")
    method = method.get("name", "") if isinstance(method, dict) else method  # a criterion object: its name
    ax.set_title(f"sensitivity of {profile.model} ({method})")
    ax.legend(fontsize=6, ncol=2)
    return save_png(fig, path, overwrite)


def plot_heatmap(profile: SensitivityProfile, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Damage (metric change from dense) per target (rows, in model order) and sparsity (columns)."""
    plt = pyplot()
    names = [e.name for e in profile.entries]
    grid = profile.grid
    values = [[float("nan")] * len(grid) for _ in names]
    for c in profile.cells:
        if c.target in names and round(c.sparsity, 9) in grid:
            values[names.index(c.target)][grid.index(round(c.sparsity, 9))] = profile.damage(c)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(grid), 1.2 + 0.22 * len(names)))
    image = ax.imshow(values, aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(grid)), [f"{s:.0%}" for s in grid], fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xlabel("sparsity")
    fig.colorbar(image, ax=ax, label=f"{profile.metric} damage")
    return save_png(fig, path, overwrite)
