"""Pruning plans (plain JSON + safetensors, no pickled code), the CLI and recipes with mode='remove'."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from structural_nets import TinyTransformer, resnet_like

import secateurs
from secateurs.cli import main
from secateurs.structural import load_structured, save_structured
from secateurs.structural.step import decode, encode

X = torch.randn(2, 3, 8, 8)


def factory() -> torch.nn.Module:
    return resnet_like(16).eval()


def test_keep_indices_are_stored_as_compact_ranges():
    keep = torch.tensor([0, 1, 2, 5, 7, 8, 9])
    assert encode(keep) == "0-2,5,7-9"
    assert torch.equal(decode(encode(keep)), keep)
    assert decode("").numel() == 0


def test_a_plain_model_replays_its_plan_onto_a_fresh_instance(tmp_path):
    model = TinyTransformer().eval()
    ids = torch.randint(0, 50, (2, 5))
    secateurs.prune(model, "magnitude", 0.5, pattern="head+channel+hidden", mode="remove", example_inputs=ids,
                    progress=False, structural={"latency": False})  # fmt: skip
    save_structured(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors", "pruning_plan.json"]
    plan = json.loads((tmp_path / "m" / "pruning_plan.json").read_text())
    assert plan["format"] == "secateurs.pruning_plan" and plan["steps"][0]["cuts"]
    fresh = load_structured(tmp_path / "m", TinyTransformer())
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)


def test_pruning_twice_replays_both_steps(tmp_path):
    model = resnet_like(16).eval()
    for _ in range(2):
        secateurs.prune(model, "magnitude", 0.25, mode="remove", example_inputs=X, progress=False,
                        structural={"latency": False})  # fmt: skip
    save_structured(model, tmp_path / "m")
    fresh = load_structured(tmp_path / "m", resnet_like(16))
    assert torch.equal(fresh(X), model(X))
    assert fresh[0].out_channels == 9  # 16 -> 12 -> 9


def test_cli_removes_channels_and_writes_plan_and_report(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "cli_models.py").write_text("from test_plan_cli import factory\n")
    monkeypatch.setitem(sys.modules, "test_plan_cli", sys.modules[__name__])
    out = tmp_path / "out"
    code = main(["prune", "cli_models:factory", "--method", "magnitude", "--sparsity", "0.5", "--mode", "remove",
                 "--pattern", "channel", "--input-shape", "3,8,8", "--round-to", "4", "--out", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "params:" in printed and "MACs:" in printed and "latency:" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["params"] < report["before"]["params"]
    assert json.loads((out / "recipe.json").read_text())["structural"]["round_to"] == 4
    model = load_structured(out, factory())
    assert all(m.out_channels % 4 == 0 for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_cli_saves_transformers_models_with_their_updated_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    out = tmp_path / "pruned"
    assert main(["prune", str(tmp_path / "dense"), "--method", "magnitude", "--sparsity", "0.5", "--mode", "remove",
                 "--pattern", "channel", "--out", str(out)]) == 0  # fmt: skip
    saved = json.loads((out / "config.json").read_text())
    assert saved["intermediate_size"] == 24
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].mlp.gate_proj.out_features == 24


def test_a_recipe_with_mode_remove_maps_one_to_one(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: magnitude\nsparsity: 0.5\nmode: remove\npattern: channel\nstructural:\n  round_to: 4\n")
    recipe = secateurs.load_recipe(path)
    config = secateurs.PruneConfig(**recipe)
    assert config.structural_.round_to == 4
    assert secateurs.PruneConfig(**config.to_dict()).to_dict() == config.to_dict()
