"""Recipes map one-to-one to the API and are validated before use."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import small_cnn
from secateurs import PruneConfig, RecipeError, load_recipe, prune

RECIPE = """
method: magnitude
sparsity: 0.8
pattern: element
allocation: global
scope:
  include: ["*"]
  exclude: ["8"]
mode: bake
"""


def test_yaml_recipe_does_what_the_same_keyword_arguments_do(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    a, b = small_cnn(), small_cnn()
    prune(a, **load_recipe(path))
    prune(b, "magnitude", 0.8, pattern="element", allocation="global", scope={"include": ["*"], "exclude": ["8"]},
          mode="bake")  # fmt: skip
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert torch.count_nonzero(a[8].weight) == a[8].weight.numel()


def test_json_recipe_and_the_report_config_round_trip(tmp_path):
    model = small_cnn()
    report = prune(model, "wanda", 0.5, calibration=[torch.randn(2, 3, 6, 6)])
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report.config))
    recipe = load_recipe(path)
    assert PruneConfig(**recipe).to_dict() == report.config
    assert recipe["comparison"] == "row"


def test_recipe_errors_name_the_file_and_the_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: magnitude\nsparsity: 1.5\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml.*sparsity"):
        load_recipe(path)
    path.write_text("method: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
    path.write_text("- a list\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(path)


def test_yaml_is_parsed_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("method: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_schedule_keys_are_validated_too():
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['stop'\]"):
        PruneConfig.from_dict({"method": "magnitude", "sparsity": 0.5, "schedule": {"kind": "linear", "stop": 3}})
