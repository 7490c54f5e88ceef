"""The bad-input matrix: every front end (API, recipes, loaders, CLI, structural removal) refuses
bad input with a typed error, and leaves the model bit-identical and the filesystem untouched.

One row per case. To add one, append to ``CASES`` with a helper:

    api("seed-is-a-string", mlp, lambda m: prune(m, "magnitude", 0.5, seed="1"), ConfigError, "seed")
    files("...", setup=lambda tmp: ..., call=lambda m, tmp: ..., error=..., match=..., model=mlp)
    cli("...", lambda tmp: ["prune", ...], "what stderr must say")

``model`` builds a fresh model (checked bit-identical afterwards, None for none); ``setup`` writes
the files a case needs into its own directory, which is snapshotted (names, bytes, modes) before
the call and compared after; ``call`` gets the model and that directory and must raise ``error``
with a message matching ``match``. CLI cases must exit with status 2 and one line on stderr
(argparse usage errors: status 2 and its usage message).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

import secateurs
from conftest import assert_unchanged, fingerprint, small_cnn, small_mlp
from secateurs import (
    ConfigError,
    DataRequiredError,
    NonFiniteError,
    PatternError,
    Pruner,
    RecipeError,
    ScopeError,
    StateError,
    StructureError,
    prune,
)
from secateurs.cli import main
from secateurs.errors import CheckpointError
from secateurs.export import load_compressed_into, save_compressed
from secateurs.recipes import load_recipe
from secateurs.structural import DependencyGraph, load_structured, remove, save_structured

MLP_FACTORY = "conftest:small_mlp"  # 16 -> 32 -> 24 -> 4
X_MLP = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
X_CNN = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
QUIET = {"latency": False}


class CliRefused(Exception):
    """A CLI call that ended with exit status 2; the message is what it printed."""


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[nn.Module | None, Path], Any]
    error: type[BaseException]
    match: str
    model: Callable[[], nn.Module] | None = None
    setup: Callable[[Path], Any] | None = None


def api(id: str, model, call, error, match) -> Case:
    return Case(id, lambda m, tmp: call(m), error, match, model)


def files(id: str, setup, call, error, match, model=None) -> Case:
    return Case(id, call, error, match, model, setup)


def cli(id: str, argv: Callable[[Path], list[str]], match: str, setup=None) -> Case:
    return Case(id, lambda m, tmp: _run_cli(argv(tmp)), CliRefused, match, None, setup)


def _run_cli(argv: list[str]) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: usage errors
            code = exit_.code
    text = err.getvalue()
    assert code == 2, f"exit status {code}, stderr: {text}"
    assert "Traceback" not in text, text
    if not text.startswith("usage:"):
        assert text.count("\n") == 1, f"not one line: {text}"
    raise CliRefused(text)


# -- models --------------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    return small_mlp()


def cnn() -> nn.Module:
    return small_cnn()


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.body = nn.Linear(8, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, ids):
        return self.head(torch.relu(self.hidden(torch.relu(self.body(self.embed(ids))))))


class TiedLM(Embedder):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight


def with_nan() -> nn.Module:
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    return model


def with_inf() -> nn.Module:
    model = mlp()
    with torch.no_grad():
        model[2].weight[1, 1] = float("-inf")
    return model


def weight_normed() -> nn.Module:
    model = mlp()
    nn.utils.parametrizations.weight_norm(model[2])
    return model


def old_weight_normed() -> nn.Module:
    import warnings

    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.utils.weight_norm(model[2])
    return model


def torch_pruned() -> nn.Module:
    model = mlp()
    torch_prune.l1_unstructured(model[2], "weight", 0.5)
    return model


def integer_weights() -> nn.Module:
    model = mlp()
    model[2].weight = nn.Parameter(torch.randint(-3, 3, (24, 32)), requires_grad=False)
    return model


def quantized() -> nn.Module:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization and quantized tensors are deprecated for torchao
        return torch.ao.quantization.quantize_dynamic(mlp(), {nn.Linear}, dtype=torch.qint8)


def on_meta() -> nn.Module:
    with torch.device("meta"):
        return mlp()


def built_in_inference_mode() -> nn.Module:
    with torch.inference_mode():
        return mlp()


def half_pruned() -> nn.Module:
    model = mlp()
    prune(model, "magnitude", 0.6, progress=False)
    return model


def masked_cnn() -> nn.Module:
    model = cnn()
    prune(model, "magnitude", 0.5, progress=False)
    return model


def torch_pruned_cnn() -> nn.Module:
    model = cnn()
    torch_prune.l1_unstructured(model[3], "weight", 0.5)
    return model


def parametrized_cnn() -> nn.Module:
    model = cnn()
    parametrize.register_parametrization(model[3], "weight", nn.Identity())
    return model


class Strided(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(self.a(x)[:, ::2])


class Spectral(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(torch.fft.fft(self.a(x), dim=1).real)


class FixedSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        left, right = self.a(x).split([4, 4], dim=1)
        return self.b(left) + self.c(right)


class HardCoded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 36, 2)

    def forward(self, x):
        return self.fc(self.conv(x).reshape(-1, 8 * 36))


class Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 4, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.attn(x, x, x)[0])


# -- files ---------------------------------------------------------------------------------------------
def _masks_file(tmp: Path, edit=None) -> None:
    model = mlp()
    prune(model, "magnitude", 0.5, scope={"skip_first": False, "skip_last": False}, progress=False)
    secateurs.save_masks(model, tmp / "masks.safetensors")
    if edit is not None:
        from safetensors import safe_open

        with safe_open(str(tmp / "masks.safetensors"), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
            metadata = f.metadata()
        edit(tensors, metadata)
        save_file(tensors, str(tmp / "masks.safetensors"), metadata=metadata)


def _rename(old: str, new: str, listed: str):
    def edit(tensors, metadata):
        tensors[new] = tensors.pop(old)
        metadata["targets"] = listed

    return edit


def _compressed_file(tmp: Path) -> None:
    model = mlp()
    prune(model, "magnitude", 0.5, mode="bake", progress=False)
    save_compressed(model, tmp / "m.safetensors")


def _corrupt(name: str, how: Callable[[bytes], bytes]):
    def setup(tmp: Path) -> None:
        path = tmp / name
        path.write_bytes(how(path.read_bytes()))

    return setup


def _then(*steps):
    def setup(tmp: Path) -> None:
        for step in steps:
            step(tmp)

    return setup


def _flip_middle(raw: bytes) -> bytes:
    data = bytearray(raw)
    data[len(data) - 40] ^= 0x10
    return bytes(data)


def _crafted_metadata(tmp: Path) -> None:
    from safetensors import safe_open

    path = tmp / "m.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = dict(f.metadata())
    entries = json.loads(metadata["tensors"])
    entries["0.bias"]["shape"] = [10**12]
    metadata["tensors"] = json.dumps(entries)
    save_file(tensors, str(path), metadata=metadata)


def _structural_dir(tmp: Path) -> None:
    model = small_cnn().eval()
    prune(model, "magnitude", 0.5, mode="remove", pattern="channel", example_inputs=X_CNN, progress=False,
          structural=QUIET)  # fmt: skip
    save_structured(model, tmp / "pruned")


def _edit_weights(edit):
    def setup(tmp: Path) -> None:
        file = tmp / "pruned" / "model.safetensors"
        state = load_file(str(file))
        edit(state)
        save_file(state, str(file), metadata={"format": "pt"})

    return setup


def _edit_plan(edit):
    def setup(tmp: Path) -> None:
        file = tmp / "pruned" / "pruning_plan.json"
        file.write_text(edit(json.loads(file.read_text())))

    return setup


def _keep(plan: dict, keep: str) -> str:
    plan["steps"][0]["cuts"][0]["keep"] = keep
    return json.dumps(plan)


def _text(name: str, text: str):
    return lambda tmp: (tmp / name).write_text(text)


def _bytes(name: str, data: bytes):
    return lambda tmp: (tmp / name).write_bytes(data)


def _pickle(name: str):
    return _bytes(name, pickle.dumps({"0.weight": [1, 2, 3]}))


def _weights(name: str, edit=None):
    def setup(tmp: Path) -> None:
        state = {k: v.clone() for k, v in small_mlp().state_dict().items()}
        if edit is not None:
            edit(state)
        save_file(state, str(tmp / name))

    return setup


def _mkdir_out(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("precious")


# -- the matrix ----------------------------------------------------------------------------------------
_P = {"progress": False}
ALL = {"skip_first": False, "skip_last": False}
# fmt: off
CASES: list[Case] = [
    # API: the type of every configuration value (one declarative parser, the field named)
    api("config-seed-is-a-string", mlp, lambda m: prune(m, "magnitude", 0.5, seed="1", **_P), ConfigError,
        "seed must be an integer, got '1'"),
    api("config-seed-is-a-float", mlp, lambda m: prune(m, "magnitude", 0.5, seed=1.5, **_P), ConfigError,
        "seed must be an integer"),
    api("config-allocation-is-a-number", mlp, lambda m: prune(m, "magnitude", 0.5, allocation=3, **_P),
        ConfigError, "allocation must be an allocation name"),
    api("config-method-options-is-a-list", mlp, lambda m: prune(m, "magnitude", 0.5, method_options=[2], **_P),
        ConfigError, "method_options must be a mapping"),
    api("config-method-option-misspelled", mlp, lambda m: prune(m, "magnitude", 0.5, method_options={"nrm": 2},
        **_P), ConfigError, r"method_options for 'magnitude'.*valid: 'norm'"),
    api("config-scope-include-is-a-number", mlp, lambda m: prune(m, "magnitude", 0.5, scope={"include": 3}, **_P),
        ConfigError, "scope.include must be a string or a list of strings"),
    api("config-scope-flag-is-a-string", mlp, lambda m: prune(m, "magnitude", 0.5, scope={"skip_last": "no"},
        **_P), ConfigError, "scope.skip_last must be True or False"),
    api("config-block-size-is-a-string", cnn, lambda m: prune(m, "magnitude", 0.5, pattern={"block": ["4", 4]},
        **_P), PatternError, r"\(integers\)"),
    api("config-sparsity-is-a-bool", mlp, lambda m: prune(m, "magnitude", True, **_P), ConfigError,
        "sparsity must be a number"),
    api("config-iterations-is-a-float", mlp, lambda m: prune(m, "magnitude", 0.5, iterations=2.0, **_P),
        ConfigError, "iterations must be a positive integer"),
    api("config-solver-options-unknown", mlp, lambda m: prune(m, "sparsegpt", 0.5, solver_options={"damp": 1},
        calibration=[X_MLP], **_P), ConfigError, r"solver_options for 'sparsegpt'.*'dampening'"),
    api("config-overrides-bad-sparsity", mlp, lambda m: prune(m, "magnitude", 0.5, overrides={"*": {"sparsity": 2}},
        **_P), ConfigError, r"overrides\['\*'\].sparsity must be a number in \[0, 1\)"),
    api("config-runner-unknown", mlp, lambda m: prune(m, "magnitude", 0.5, runner="gpu", **_P), ConfigError,
        "runner must be one of 'blocks', 'model'"),
    # API: values of every kind of argument
    api("api-sparsity-1", mlp, lambda m: prune(m, "magnitude", 1.0, **_P), ConfigError, r"\[0, 1\)"),
    api("api-sparsity-negative", mlp, lambda m: prune(m, "magnitude", -0.2, **_P), ConfigError, r"\[0, 1\)"),
    api("api-sparsity-1.5", mlp, lambda m: prune(m, "magnitude", 1.5, **_P), ConfigError, r"\[0, 1\)"),
    api("api-sparsity-nan", mlp, lambda m: prune(m, "magnitude", float("nan"), **_P), ConfigError, r"\[0, 1\)"),
    api("api-sparsity-inf", mlp, lambda m: prune(m, "magnitude", float("inf"), **_P), ConfigError, r"\[0, 1\)"),
    api("api-sparsity-bool", mlp, lambda m: prune(m, "magnitude", True, **_P), ConfigError, r"\[0, 1\)"),
    api("api-sparsity-string", mlp, lambda m: prune(m, "magnitude", "0.5", **_P), ConfigError, r"\[0, 1\)"),
    api("api-sparsity-missing", mlp, lambda m: prune(m, "magnitude", **_P), ConfigError, "sparsity is required"),
    api("api-method-unknown", mlp, lambda m: prune(m, "nope", 0.5, **_P), ConfigError, "unknown method"),
    api("api-pattern-n-not-below-m", mlp, lambda m: prune(m, pattern="4:2", **_P), PatternError, "0 < N < M"),
    api("api-pattern-m-not-dividing", mlp, lambda m: prune(m, pattern="1:3", **_P), PatternError, "divisible by 3"),
    api("api-pattern-unknown", mlp, lambda m: prune(m, "magnitude", 0.5, pattern="zigzag", **_P), PatternError,
        "unknown pattern"),
    api("api-pattern-nm-and-sparsity-disagree", mlp, lambda m: prune(m, "magnitude", 0.3, pattern="2:4", **_P),
        ConfigError, "implies sparsity 0.5"),
    api("api-block-does-not-tile", cnn, lambda m: prune(m, "magnitude", 0.5, pattern="block:5x5", **_P),
        PatternError, "does not tile"),
    api("api-mode-unknown", mlp, lambda m: prune(m, "magnitude", 0.5, mode="delete", **_P), ConfigError,
        "mode must be one of 'bake', 'mask', 'reconstruct', 'remove', got 'delete'"),
    api("api-allocation-unknown", mlp, lambda m: prune(m, "magnitude", 0.5, allocation="fair", **_P), ConfigError,
        "unknown allocation"),
    api("api-comparison-unknown", mlp, lambda m: prune(m, "magnitude", 0.5, comparison="diagonal", **_P),
        ConfigError, "comparison must be one of 'layer', 'row'"),
    api("api-schedule-in-prune", mlp, lambda m: prune(m, "magnitude", 0.5, schedule={"kind": "cubic", "start": 0,
        "end": 5}, **_P), ConfigError, "Pruner"),
    api("api-structural-without-remove", mlp, lambda m: prune(m, "magnitude", 0.5, structural={"round_to": 8},
        **_P), ConfigError, "only with mode='remove'"),
    api("api-unknown-option", mlp, lambda m: prune(m, "magnitude", 0.5, colour="red", **_P), ConfigError,
        r"prune\(\) got unknown keyword\(s\) 'colour'; valid: .*'sparsity'"),
    # API: scope
    api("scope-matches-nothing", mlp, lambda m: prune(m, "magnitude", 0.5, scope={"include": ["decoder.*"]}, **_P),
        ScopeError, "pattern 'decoder.*' matches no module"),
    api("scope-unknown-type", mlp, lambda m: prune(m, "magnitude", 0.5, scope={"types": ["Conv9d"]}, **_P),
        ScopeError, "unknown module type"),
    api("scope-unknown-key", mlp, lambda m: prune(m, "magnitude", 0.5, scope={"inclde": ["*"]}, **_P), ScopeError,
        "unknown scope key"),
    api("scope-bad-regex", mlp, lambda m: prune(m, "magnitude", 0.5, scope={"include": ["re:("]}, **_P),
        ScopeError, "not a valid regex"),
    api("scope-tied-holder-excluded", TiedLM, lambda m: prune(m, "magnitude", 0.5,
        scope={"embeddings": True, "exclude": ["head"]}, **_P), ScopeError, "tied to head.weight"),
    # API: weights the library must recognise
    api("weights-nan", with_nan, lambda m: prune(m, "magnitude", 0.5, **_P), NonFiniteError, r"weight 2\.weight"),
    api("weights-inf", with_inf, lambda m: prune(m, "magnitude", 0.5, **_P), NonFiniteError, r"weight 2\.weight"),
    api("weights-weight-norm", weight_normed, lambda m: prune(m, "magnitude", 0.5, **_P), ScopeError,
        r"'2'.*several tensors.*remove_parametrizations"),
    api("weights-old-weight-norm", old_weight_normed, lambda m: prune(m, "magnitude", 0.5, **_P), ScopeError,
        r"'2'.*remove_weight_norm"),
    api("weights-torch-prune-mask-mode", torch_pruned, lambda m: prune(m, "magnitude", 0.5, **_P), ScopeError,
        r"'2'.*torch.nn.utils.prune.remove"),
    api("weights-torch-prune-bake-mode", torch_pruned, lambda m: prune(m, "magnitude", 0.5, mode="bake", **_P),
        ScopeError, r"torch.nn.utils.prune"),
    api("weights-integer", integer_weights, lambda m: prune(m, "magnitude", 0.5, **_P), ScopeError,
        r"'2'.*torch.int64 weight"),
    api("weights-quantized-model", quantized, lambda m: prune(m, "magnitude", 0.5, **_P), ScopeError,
        "quantized modules"),
    api("weights-meta-mask", on_meta, lambda m: prune(m, "magnitude", 0.5, **_P), ScopeError, "meta device"),
    api("weights-meta-bake", on_meta, lambda m: prune(m, "magnitude", 0.5, mode="bake", **_P), ScopeError,
        "meta device"),
    api("weights-inference-tensors-gradients", built_in_inference_mode, lambda m: prune(m, "taylor", 0.5,
        calibration=[(X_MLP, torch.tensor([0, 1]))], **_P), StateError, "inference_mode"),
    api("second-prune-lower-target", half_pruned, lambda m: prune(m, "magnitude", 0.3, **_P), ConfigError,
        r"already 60\.00% sparse"),
    # API: data
    api("data-calibration-string", mlp, lambda m: prune(m, "wanda", 0.5, calibration="text.txt", **_P),
        DataRequiredError, "calibration is a str"),
    api("data-calibration-bytes", mlp, lambda m: prune(m, "wanda", 0.5, calibration=b"abc", **_P),
        DataRequiredError, "calibration is a bytes"),
    api("data-calibration-not-iterable", mlp, lambda m: prune(m, "wanda", 0.5, calibration=3, **_P),
        DataRequiredError, "iterable of batches"),
    api("data-wanda-without-calibration", mlp, lambda m: prune(m, "wanda", 0.5, **_P), DataRequiredError,
        "calibration="),
    api("data-synflow-without-shape", mlp, lambda m: prune(m, "synflow", 0.5, **_P), DataRequiredError,
        "example_inputs"),
    api("data-gradient-without-labels", mlp, lambda m: prune(m, "taylor", 0.5, calibration=[X_MLP], **_P),
        DataRequiredError, "no targets"),
    api("data-batch-wrong-width", mlp, lambda m: prune(m, "wanda", 0.5, calibration=[torch.randn(2, 5)], **_P),
        DataRequiredError, r"fails on the first sample of the first calibration batch \(Tensor\[1, 5\] float32\)"),
    api("data-batch-wrong-dtype", mlp, lambda m: prune(m, "wanda", 0.5, calibration=[torch.ones(2, 16,
        dtype=torch.long)], **_P), DataRequiredError, "int64"),
    api("data-batch-none", mlp, lambda m: prune(m, "wanda", 0.5, calibration=[None], **_P), DataRequiredError,
        "NoneType"),
    api("data-batch-list-of-strings", mlp, lambda m: prune(m, "wanda", 0.5, calibration=[["a", "b"]], **_P),
        DataRequiredError, r"fails on the first sample .*\(str\)"),
    api("data-batch-wrong-width-later", mlp, lambda m: prune(m, "wanda", 0.5, calibration=[X_MLP,
        torch.randn(2, 5)], **_P), DataRequiredError, r"fails on a calibration batch \(Tensor\[2, 5\] float32\)"),
    api("data-token-ids-too-large", Embedder, lambda m: prune(m, "wanda", 0.5, calibration=[torch.tensor([[1,
        12]])], **_P), DataRequiredError, r"token ids 1\.\.12.*10 entries"),
    api("data-token-ids-negative", Embedder, lambda m: prune(m, "wanda", 0.5, calibration=[torch.tensor([[-1,
        2]])], **_P), DataRequiredError, r"token ids -1\.\.2"),
    api("data-labels-out-of-range", mlp, lambda m: prune(m, "taylor", 0.5, calibration=[(X_MLP,
        torch.tensor([0, 7]))], **_P), DataRequiredError, r"class 7.*4 classes"),
    api("data-labels-negative", mlp, lambda m: prune(m, "taylor", 0.5, calibration=[(X_MLP,
        torch.tensor([-3, 1]))], **_P), DataRequiredError, r"class -3"),
    api("data-float-targets-wrong-shape", mlp, lambda m: prune(m, "taylor", 0.5, calibration=[(X_MLP,
        torch.zeros(2, 7))], **_P), DataRequiredError, r"\[2, 7\] do not match"),
    api("data-example-inputs-wrong-shape", mlp, lambda m: prune(m, "magnitude", 0.5,
        example_inputs=torch.randn(1, 5), **_P), DataRequiredError, "fails on example_inputs"),
    api("data-example-inputs-wrong-rank", cnn, lambda m: prune(m, "magnitude", 0.5,
        example_inputs=torch.randn(3, 6), **_P), DataRequiredError, "fails on example_inputs"),
    api("data-example-inputs-from-calibration", mlp, lambda m: prune(m, "magnitude", 0.5,
        calibration=[torch.randn(2, 7)], **_P), DataRequiredError, "first sample of the first calibration batch"),
    # API: Pruner
    api("pruner-sparsity-out-of-range", mlp, lambda m: Pruner(m, "magnitude", 0.5).prune_to(1.2), ConfigError,
        r"\[0, 1\)"),
    api("pruner-state-from-another-config", mlp, lambda m: Pruner(m, "magnitude", 0.5).load_state_dict(
        {"config": {"method": "wanda"}, "step_count": 0, "current_sparsity": 0.0}), StateError, "different config"),
    api("pruner-lower-target", half_pruned, lambda m: Pruner(m, "magnitude", 0.9).prune_to(0.2), ConfigError,
        "already 60.00% sparse"),
    # recipes
    files("recipe-duplicate-yaml-key", _text("r.yaml", "method: wanda\nsparsity: 0.5\nsparsity: 0.7\n"),
          lambda m, t: load_recipe(t / "r.yaml"), RecipeError, r"'sparsity' is given twice \(lines 2 and 3\)"),
    files("recipe-duplicate-nested-yaml-key", _text("r.yaml", "sparsity: 0.5\nscope:\n  include: [a]\n  "
          "include: [b]\n"), lambda m, t: load_recipe(t / "r.yaml"), RecipeError, "'include' is given twice"),
    files("recipe-duplicate-json-key", _text("r.json", '{"sparsity": 0.5, "sparsity": 0.6}'),
          lambda m, t: load_recipe(t / "r.json"), RecipeError, "given twice"),
    files("recipe-python-tag", _text("r.yaml", "method: !!python/object/apply:os.system ['echo pwned']\n"),
          lambda m, t: load_recipe(t / "r.yaml"), RecipeError, "not valid YAML"),
    files("recipe-unknown-key", _text("r.yaml", "method: magnitude\nsparsty: 0.5\n"),
          lambda m, t: load_recipe(t / "r.yaml"), RecipeError, r"unknown key\(s\) \['sparsty'\]"),
    files("recipe-not-a-mapping", _text("r.yaml", "- magnitude\n- 0.5\n"), lambda m, t: load_recipe(t / "r.yaml"),
          RecipeError, "must be a mapping"),
    files("recipe-bad-yaml", _text("r.yaml", "method: [magnitude\n"), lambda m, t: load_recipe(t / "r.yaml"),
          RecipeError, "not valid YAML"),
    files("recipe-bad-json", _text("r.json", '{"method": "magnitude",}'), lambda m, t: load_recipe(t / "r.json"),
          RecipeError, "not valid JSON"),
    files("recipe-missing", None, lambda m, t: load_recipe(t / "nope.yaml"), RecipeError, "cannot read recipe"),
    files("recipe-not-text", _bytes("r.yaml", b"\xff\xfe\x00\x9c"), lambda m, t: load_recipe(t / "r.yaml"),
          RecipeError, "cannot read recipe"),
    files("recipe-bad-value", _text("r.yaml", "method: magnitude\nsparsity: 2\n"),
          lambda m, t: load_recipe(t / "r.yaml"), RecipeError, r"\[0, 1\)"),
    files("recipe-unknown-method", _text("r.yaml", "method: nope\nsparsity: 0.5\n"),
          lambda m, t: load_recipe(t / "r.yaml"), RecipeError, "unknown method"),
    # loaders: masks
    files("masks-for-a-bias", lambda t: _masks_file(t, lambda ts, md: (ts.update({"0.bias": torch.ones(32,
          dtype=torch.uint8)}), md.update(targets='["0.bias", "0.weight", "2.weight", "4.weight"]'))),
          lambda m, t: secateurs.load_masks(m, t / "masks.safetensors"), StateError, "not a weight secateurs prunes",
          mlp),
    files("masks-float-values", lambda t: _masks_file(t, lambda ts, md: ts.update({"0.weight": torch.full((32, 16),
          0.25)})), lambda m, t: secateurs.load_masks(m, t / "masks.safetensors"), CheckpointError, "not boolean",
          mlp),
    files("masks-value-two", lambda t: _masks_file(t, lambda ts, md: ts.update({"2.weight": ts["2.weight"] * 2})),
          lambda m, t: secateurs.load_masks(m, t / "masks.safetensors"), CheckpointError, "not boolean", mlp),
    files("masks-unknown-module", lambda t: _masks_file(t, _rename("0.weight", "9.weight",
          '["2.weight", "4.weight", "9.weight"]')), lambda m, t: secateurs.load_masks(m, t / "masks.safetensors"),
          StateError, "names no module", mlp),
    files("masks-unknown-tensor", lambda t: _masks_file(t, _rename("0.weight", "0.gamma",
          '["0.gamma", "2.weight", "4.weight"]')), lambda m, t: secateurs.load_masks(m, t / "masks.safetensors"),
          StateError, "not a weight secateurs prunes", mlp),
    files("masks-partial-file", lambda t: _masks_file(t, lambda ts, md: ts.pop("4.weight")),
          lambda m, t: secateurs.load_masks(m, t / "masks.safetensors"), CheckpointError, "incomplete", mlp),
    files("masks-not-a-masks-file", lambda t: _masks_file(t, lambda ts, md: md.update(format="pt")),
          lambda m, t: secateurs.load_masks(m, t / "masks.safetensors"), CheckpointError, "not a secateurs masks",
          mlp),
    files("masks-wrong-shape", lambda t: _masks_file(t, lambda ts, md: ts.update({"4.weight": torch.ones(2, 2,
          dtype=torch.uint8)})), lambda m, t: secateurs.load_masks(m, t / "masks.safetensors"), StateError,
          r"has shape \(2, 2\)", mlp),
    files("masks-pickle", _pickle("masks.pt"), lambda m, t: secateurs.load_masks(m, t / "masks.pt"),
          CheckpointError, "not a readable safetensors file", mlp),
    files("masks-missing-file", None, lambda m, t: secateurs.load_masks(m, t / "nope.safetensors"),
          CheckpointError, "does not exist", mlp),
    files("masks-truncated", _then(_masks_file, _corrupt("masks.safetensors", lambda b: b[:-7])),
          lambda m, t: secateurs.load_masks(m, t / "masks.safetensors"), CheckpointError, "not a readable", mlp),
    files("masks-empty-file", _bytes("masks.safetensors", b""),
          lambda m, t: secateurs.load_masks(m, t / "masks.safetensors"), CheckpointError, "not a readable", mlp),
    files("masks-unknown-mode", _masks_file, lambda m, t: secateurs.load_masks(m, t / "masks.safetensors",
          mode="shred"), StateError, "unknown mode", mlp),
    # loaders: compressed checkpoints
    files("compressed-other-shape", _compressed_file, lambda m, t: load_compressed_into(m, t / "m.safetensors"),
          CheckpointError, "shape mismatch", lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24),
          nn.ReLU(), nn.Linear(24, 5))),
    files("compressed-missing-keys", _compressed_file, lambda m, t: load_compressed_into(m, t / "m.safetensors"),
          CheckpointError, "missing", lambda: nn.Sequential(*small_mlp(), nn.Linear(4, 4))),
    files("compressed-unexpected-keys", _compressed_file, lambda m, t: load_compressed_into(m, t / "m.safetensors"),
          CheckpointError, "unexpected", lambda: nn.Sequential(*list(small_mlp())[:3])),
    files("compressed-flipped-byte", _then(_compressed_file, _corrupt("m.safetensors", _flip_middle)),
          lambda m, t: load_compressed_into(m, t / "m.safetensors"), CheckpointError, "checksum|corrupted", mlp),
    files("compressed-truncated", _then(_compressed_file, _corrupt("m.safetensors", lambda b: b[:-100])),
          lambda m, t: load_compressed_into(m, t / "m.safetensors"), CheckpointError, "truncated|corrupted", mlp),
    files("compressed-huge-shape", _then(_compressed_file, _crafted_metadata),
          lambda m, t: load_compressed_into(m, t / "m.safetensors"), CheckpointError, r"expected \[1000000000000\]",
          mlp),
    files("compressed-plain-safetensors", _weights("m.safetensors"),
          lambda m, t: load_compressed_into(m, t / "m.safetensors"), CheckpointError, "not a secateurs compressed",
          mlp),
    files("compressed-missing-file", None, lambda m, t: load_compressed_into(m, t / "m.safetensors"),
          CheckpointError, "does not exist", mlp),
    files("compressed-pickle", _pickle("m.safetensors"), lambda m, t: load_compressed_into(m, t / "m.safetensors"),
          CheckpointError, "not a readable", mlp),
    # loaders: structurally pruned models
    files("structural-weights-wrong-shape", _then(_structural_dir, _edit_weights(lambda s: s.update({"0.bias":
          torch.zeros(3)}))), lambda m, t: load_structured(t / "pruned", m), CheckpointError, "shape mismatch 0.bias",
          cnn),
    files("structural-weights-missing-key", _then(_structural_dir, _edit_weights(lambda s: s.pop("3.weight"))),
          lambda m, t: load_structured(t / "pruned", m), CheckpointError, "missing 3.weight", cnn),
    files("structural-weights-truncated", _then(_structural_dir, _corrupt("pruned/model.safetensors",
          lambda b: b[:-50])), lambda m, t: load_structured(t / "pruned", m), CheckpointError, "not a readable", cnn),
    files("structural-plan-not-json", _then(_structural_dir, _edit_plan(lambda p: "{oops")),
          lambda m, t: load_structured(t / "pruned", m), CheckpointError, "not valid JSON", cnn),
    files("structural-plan-index-out-of-range", _then(_structural_dir, _edit_plan(lambda p: _keep(p, "0-99"))),
          lambda m, t: load_structured(t / "pruned", m), StructureError, "not sorted, unique positions", cnn),
    files("structural-plan-other-architecture", _structural_dir, lambda m, t: load_structured(t / "pruned", m),
          StructureError, "expects 0.weight with size 8", lambda: nn.Sequential(nn.Conv2d(3, 5, 3))),
    files("structural-plan-missing", None, lambda m, t: load_structured(t / "nothing", m), StateError, "cannot read",
          cnn),
    files("structural-plain-model-without-model", _structural_dir, lambda m, t: load_structured(t / "pruned"),
          StateError, "construct the unpruned model"),
    files("structural-save-without-plan", None, lambda m, t: save_structured(m, t / "out"), StateError,
          "no pruning plan", cnn),
    files("structural-save-over-existing", _mkdir_out, lambda m, t: save_structured(m, t / "out"),
          secateurs.io.OutputExistsError, "already exists", lambda: _pruned_cnn()),
    # CLI
    cli("cli-weights-pickle", lambda t: ["prune", MLP_FACTORY, "--sparsity", "0.5", "--weights", str(t / "w.pt"),
        "--out", str(t / "out")], "not a readable safetensors file", _pickle("w.pt")),
    cli("cli-weights-wrong-shape", lambda t: ["prune", MLP_FACTORY, "--sparsity", "0.5", "--weights",
        str(t / "w.safetensors"), "--out", str(t / "out")], "shape mismatch.*pass --weights thatfolder/",
        _weights("w.safetensors", lambda s: s.update({"2.weight": torch.zeros(3, 3)}))),
    cli("cli-weights-missing-key", lambda t: ["prune", MLP_FACTORY, "--sparsity", "0.5", "--weights",
        str(t / "w.safetensors"), "--out", str(t / "out")], "missing 4.bias",
        _weights("w.safetensors", lambda s: s.pop("4.bias"))),
    cli("cli-weights-missing-file", lambda t: ["prune", MLP_FACTORY, "--sparsity", "0.5", "--weights",
        str(t / "nope.safetensors"), "--out", str(t / "out")], "does not exist"),
    cli("cli-input-shape-letters", lambda t: ["prune", MLP_FACTORY, "--sparsity", "0.5", "--input-shape", "a,b",
        "--out", str(t / "out")], "positive integers"),
    cli("cli-input-shape-zero", lambda t: ["prune", MLP_FACTORY, "--sparsity", "0.5", "--input-shape", "0,16",
        "--out", str(t / "out")], "positive integers"),
    cli("cli-input-shape-wrong", lambda t: ["prune", MLP_FACTORY, "--sparsity", "0.5", "--input-shape", "7",
        "--out", str(t / "out")], "fails on example_inputs"),
    cli("cli-data-does-not-import", lambda t: ["prune", MLP_FACTORY, "--method", "wanda", "--sparsity", "0.5",
        "--data", "no_such_module_xyz:batches", "--out", str(t / "out")], "cannot be imported"),
    cli("cli-data-not-a-spec", lambda t: ["prune", MLP_FACTORY, "--method", "wanda", "--sparsity", "0.5",
        "--data", "batches", "--out", str(t / "out")], "must be 'package.module:function'"),
    cli("cli-data-not-callable", lambda t: ["prune", MLP_FACTORY, "--method", "wanda", "--sparsity", "0.5",
        "--data", "conftest:X_MLP_MISSING", "--out", str(t / "out")], "has no function 'X_MLP_MISSING'"),
    cli("cli-model-path-missing", lambda t: ["prune", str(t / "models" / "nope"), "--sparsity", "0.5",
        "--out", str(t / "out")], "does not exist"),
    cli("cli-model-factory-missing", lambda t: ["prune", "no_such_module_xyz:model", "--sparsity", "0.5",
        "--out", str(t / "out")], "cannot be imported"),
    cli("cli-model-dir-without-config", lambda t: ["prune", str(t), "--sparsity", "0.5", "--out", str(t / "out")],
        "neither"),
    cli("cli-out-under-a-file", lambda t: ["prune", MLP_FACTORY, "--sparsity", "0.5", "--out",
        str(t / "file" / "out")], "Not a directory", _text("file", "x")),
    cli("cli-out-exists", lambda t: ["prune", MLP_FACTORY, "--sparsity", "0.5", "--out", str(t / "out")],
        "--overwrite", _mkdir_out),
    cli("cli-method-unknown", lambda t: ["prune", MLP_FACTORY, "--method", "nope", "--sparsity", "0.5", "--out",
        str(t / "out")], "unknown method"),
    cli("cli-sparsity-out-of-range", lambda t: ["prune", MLP_FACTORY, "--sparsity", "2", "--out", str(t / "out")],
        r"\[0, 1\)"),
    cli("cli-pattern-unknown", lambda t: ["prune", MLP_FACTORY, "--pattern", "zigzag", "--sparsity", "0.5",
        "--out", str(t / "out")], "unknown pattern"),
    cli("cli-recipe-duplicate-key", lambda t: ["prune", MLP_FACTORY, "--recipe", str(t / "r.yaml"), "--out",
        str(t / "out")], "given twice", _text("r.yaml", "sparsity: 0.5\nsparsity: 0.6\n")),
    cli("cli-recipe-missing", lambda t: ["prune", MLP_FACTORY, "--recipe", str(t / "r.yaml"), "--out",
        str(t / "out")], "cannot read recipe"),
    cli("cli-report-masks-pickle", lambda t: ["report", MLP_FACTORY, "--masks", str(t / "m.pt")],
        "not a readable safetensors file", _pickle("m.pt")),
    cli("cli-report-weights-wrong-shape", lambda t: ["report", MLP_FACTORY, "--weights", str(t / "w.safetensors")],
        "shape mismatch", _weights("w.safetensors", lambda s: s.update({"0.weight": torch.zeros(1)}))),
    cli("cli-eval-nothing-to-do", lambda t: ["eval", str(t)], "nothing to evaluate"),
    cli("cli-eval-missing-model", lambda t: ["eval", str(t / "nope"), "--ppl", str(t / "x.txt")], "does not exist",
        _text("x.txt", "hello")),
    # structural removal
    api("remove-fixed-size-split", FixedSplit, lambda m: prune(m, "magnitude", 0.5, mode="remove",
        pattern="channel", example_inputs=X_CNN, structural=QUIET, **_P), StructureError, r"fixed sizes \[4, 4\]"),
    api("remove-strided-slice", Strided, lambda m: prune(m, "magnitude", 0.5, mode="remove", pattern="channel",
        example_inputs=X_CNN, structural=QUIET, **_P), ScopeError, r"reads fixed channel positions \(\[::2\]\)"),
    api("remove-fft-on-channels", Spectral, lambda m: prune(m, "magnitude", 0.5, mode="remove", pattern="channel",
        example_inputs=X_CNN, structural=QUIET, **_P), StructureError, r"unsupported op torch\.fft\.fft"),
    api("remove-hard-coded-shape", HardCoded, lambda m: prune(m, "magnitude", 0.5, mode="remove",
        pattern="channel", example_inputs=X_CNN, structural=QUIET, **_P), StructureError, "restored"),
    api("remove-masked-weights", masked_cnn, lambda m: prune(m, "magnitude", 0.5, mode="remove", pattern="channel",
        example_inputs=X_CNN, structural=QUIET, **_P), StructureError, "secateurs.bake"),
    api("remove-torch-pruned", torch_pruned_cnn, lambda m: prune(m, "magnitude", 0.5, mode="remove",
        pattern="channel", example_inputs=X_CNN, structural=QUIET, **_P), StructureError, "torch.nn.utils.prune"),
    api("remove-parametrized", parametrized_cnn, lambda m: prune(m, "magnitude", 0.5, mode="remove",
        pattern="channel", example_inputs=X_CNN, structural=QUIET, **_P), StructureError, "parametrized tensors"),
    api("remove-every-head", Heads, lambda m: prune(m, "magnitude", 0.9, mode="remove", pattern="head",
        example_inputs=torch.randn(1, 5, 8), structural=QUIET, **_P), ConfigError, "4 head units"),
    api("remove-without-example-inputs", cnn, lambda m: prune(m, "magnitude", 0.5, mode="remove", **_P),
        DataRequiredError, "example_inputs"),
    api("remove-bad-example-inputs", cnn, lambda m: prune(m, "magnitude", 0.5, mode="remove", pattern="channel",
        example_inputs=torch.randn(1, 4, 6, 6), structural=QUIET, **_P), DataRequiredError, "fails on example_inputs"),
    api("remove-unknown-group", cnn, lambda m: remove(m, {"nope": [0]}, X_CNN), StructureError, "no group named"),
    api("remove-unit-out-of-range", cnn, lambda m: remove(m, {_first_group(m): [99]}, X_CNN), StructureError,
        "has units"),
    api("remove-every-unit", cnn, lambda m: remove(m, {_first_group(m): list(range(8))}, X_CNN), StructureError,
        "keep at least one"),
    api("remove-unknown-structural-option", cnn, lambda m: prune(m, "magnitude", 0.5, mode="remove",
        example_inputs=X_CNN, structural={"round": 8}, **_P), ConfigError, "unknown structural option"),
    api("remove-allocation-key-names-no-group", cnn, lambda m: prune(m, "magnitude", 0.5, mode="remove",
        pattern="channel", allocation={"typo": 0.2}, example_inputs=X_CNN, structural=QUIET, **_P), ConfigError,
        "allocation key 'typo' matches no group"),
    # found by the review of the one pipeline
    api("config-scope-is-a-number", mlp, lambda m: prune(m, "magnitude", 0.5, scope=5, **_P), ScopeError,
        "scope must be a glob, a list of globs"),
    api("config-override-key-bad-regex", mlp, lambda m: prune(m, "magnitude", 0.5, overrides={"re:(": 0.3}, **_P),
        ScopeError, r"overrides key 're:\(' is not a valid regex"),
    api("config-allocation-key-bad-regex", mlp, lambda m: prune(m, "magnitude", None, allocation={"re:(": 0.3},
        **_P), ScopeError, r"allocation key 're:\(' is not a valid regex"),
    api("config-override-method-default-allocation", mlp, lambda m: prune(m, "magnitude", 0.5,
        overrides={"*": {"method": "lamp"}}, **_P), ConfigError, "'lamp' ranks with allocation 'global' by default"),
    api("config-override-method-default-rounds", mlp, lambda m: prune(m, "magnitude", 0.5, allocation="global",
        overrides={"*": {"method": "synflow"}}, example_inputs=X_MLP, **_P), ConfigError, "in 100 rounds by default"),
    api("call-progress-not-a-bool", mlp, lambda m: prune(m, "magnitude", 0.5, progress="x"), ConfigError,
        "progress must be True or False"),
    api("call-allow-collapse-not-a-bool", mlp, lambda m: prune(m, "magnitude", 0.5, allow_collapse="x", **_P),
        ConfigError, "allow_collapse must be True or False"),
    api("data-loss-fn-not-callable", mlp, lambda m: prune(m, "gradient", 0.5, loss_fn="ce",
        calibration=[(X_MLP, torch.tensor([0, 1]))], **_P), ConfigError, "loss_fn must be a function"),
    api("data-loss-fn-not-a-scalar", mlp, lambda m: prune(m, "gradient", 0.5, loss_fn=lambda model, b: model(b[0]),
        calibration=[(X_MLP, torch.tensor([0, 1]))], **_P), DataRequiredError, "must return a scalar tensor"),
    api("blocks-batch-wrong-width", mlp, lambda m: prune(m, "wanda", 0.5, runner="blocks", blocks="",
        calibration=[torch.randn(2, 5)], **_P), DataRequiredError, r"fails on a calibration batch \(Tensor\[2, 5\]"),
    api("explicit-allocation-below-masks", half_pruned, lambda m: prune(m, "magnitude", None, allocation={"2": 0.3},
        **_P), ConfigError, r"'2.weight' is already 60\.\d+% sparse"),
    api("trial-of-a-number", None, lambda m: secateurs.trial(5).__enter__(), ConfigError, "torch.nn.Module"),
]
# fmt: on


def _first_group(model: nn.Module) -> str:
    return DependencyGraph(model, X_CNN).groups[0].name


def _pruned_cnn() -> nn.Module:
    model = small_cnn().eval()
    prune(model, "magnitude", 0.5, mode="remove", pattern="channel", example_inputs=X_CNN, progress=False,
          structural=QUIET)  # fmt: skip
    return model


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, permissions and content hash."""
    entries = {}
    for path in sorted(root.rglob("*")):
        mode = path.stat().st_mode & 0o777
        content = None if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        entries[str(path.relative_to(root))] = (path.is_dir(), mode, content)
    return entries


def test_the_matrix_is_large_and_its_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) >= 100 and len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_a_typed_error_and_nothing_changes(case: Case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative path a case writes lands in its own directory
    if case.setup is not None:
        case.setup(tmp_path)
    model = case.model() if case.model is not None else None
    before_model = fingerprint(model) if model is not None and _comparable(model) else None
    before_files = snapshot(tmp_path)
    with pytest.raises(case.error, match=case.match) as raised:
        case.call(model, tmp_path)
    if case.error is not CliRefused and not issubclass(case.error, TypeError):
        assert isinstance(raised.value, secateurs.SecateursError), f"untyped {type(raised.value).__name__}"
    if before_model is not None:
        assert_unchanged(model, before_model)
    if model is not None:
        assert not secateurs.masking.masked_targets(model) or _masked_before(case), "masks were left behind"
    assert snapshot(tmp_path) == before_files, "the filesystem changed"


def _comparable(model: nn.Module) -> bool:
    """Meta tensors have no values and quantized modules keep packed parameters: compare the rest."""
    state = model.state_dict()
    return all(isinstance(v, torch.Tensor) and not v.is_meta for v in state.values())


def _masked_before(case: Case) -> bool:
    return case.model in (half_pruned, masked_cnn)
