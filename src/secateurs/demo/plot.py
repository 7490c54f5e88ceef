"""The demo's figure: held-out accuracy per method, and where each method put the CNN's weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: methods whose per-layer densities the right panel compares (all at 90% overall sparsity)
COMPARED = ("global magnitude 90% + fine-tune", "SNIP 90% at init, then train", "SynFlow 90% at init, then train")


def _layer_label(layer: dict[str, Any]) -> str:
    """``3 Conv2d 64x32x3x3``: the module's name, type and weight shape (the names of an
    ``nn.Sequential`` are bare indices, which say little alone)."""
    return f"{layer['name'].removesuffix('.weight')} {layer['type']}\n{'x'.join(map(str, layer['shape']))}"


def plot(rows: list[Any], reports: dict[str, dict[str, dict]], path: Path) -> bool:
    """Write the figure to ``path``; False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import PercentFormatter
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    models = list(dict.fromkeys(r.model for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        accs = [100 * next((r.accuracy for r in rows if r.model == m and r.method == k), 0.0) for k in methods]
        bars = left.bar([j + i * width for j in range(len(methods))], accs, width, label=m.upper())
        left.bar_label(bars, fmt="%.1f%%", fontsize=7, padding=2)
    left.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(methods))])
    left.set_xticklabels([k.replace(", then train", "").replace(" + fine-tune", "") for k in methods],
                         rotation=20, ha="right", fontsize=8)  # fmt: skip
    left.set_ylim(0, 118)  # headroom above 100%: the legend sits there, off the bars
    left.set_yticks(range(0, 101, 20))
    left.yaxis.set_major_formatter(PercentFormatter())
    left.set_ylabel("held-out accuracy")
    left.set_title("digits: accuracy after pruning to 90% (2:4: 50%) and training")
    left.legend(loc="upper center", ncol=len(models), frameon=False)

    layers, top = None, 0.0
    bar = 0.8 / len(COMPARED)
    for k, method in enumerate(COMPARED):  # bars, not lines: every value gets its own label, none overprint
        layers = reports["cnn"][method]["layers"]
        density = [100 * (1 - layer["sparsity"]) for layer in layers]
        top = max(top, *density)
        label = method.split(",")[0].replace(" + fine-tune", "")
        bars = right.bar([x + k * bar for x in range(len(layers))], density, bar, label=label)
        right.bar_label(bars, fmt="%.1f%%", fontsize=7, padding=2)
    if layers is not None:
        right.set_xticks([x + bar * (len(COMPARED) - 1) / 2 for x in range(len(layers))])
        right.set_xticklabels([_layer_label(layer) for layer in layers], fontsize=8)
    right.set_ylim(0, top * 1.35)  # headroom: the legend sits above the bars
    right.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    right.set_ylabel("weights kept (density)")
    right.set_title("CNN: per-layer density at 90% sparsity of the pruned layers")
    right.legend(loc="upper center", ncol=len(COMPARED), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
