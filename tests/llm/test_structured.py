"""FLAP and ShortGPT through prune_llm and the CLI (removal itself is the structural module's)."""

from __future__ import annotations

import json

import pytest
import torch

from secateurs import ConfigError
from secateurs.llm import LLMPruneConfig, prune_llm

from .conftest import tiny

structural = pytest.importorskip("secateurs.structural")


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_flap_removes_heads_and_neurons_and_the_model_still_runs(segments):
    model = tiny("llama")
    before = _params(model)
    report = prune_llm(model, "flap", 0.3, calibration=segments, progress=False)
    assert _params(model) < before
    assert report.params_ratio < 1.0
    with torch.no_grad():
        assert torch.isfinite(model(segments[:2]).logits).all()


def test_the_llm_front_doors_time_nothing_unless_asked(segments):
    """Timing keeps a dense copy beside the pruned model: doubling a large model's memory is opt-in."""
    from secateurs.llm import prune_heads_and_neurons, remove_layers

    assert prune_llm(tiny("llama"), "flap", 0.3, calibration=segments, progress=False).latency is None
    assert prune_heads_and_neurons(tiny("llama"), 0.3, calibration=segments, progress=False).latency is None
    assert remove_layers(tiny("llama"), 1, calibration=segments, progress=False).latency is None
    asked = prune_llm(tiny("llama"), "flap", 0.3, calibration=segments, progress=False, structural={"latency": True})
    assert asked.latency is not None
    assert LLMPruneConfig(method="flap", sparsity=0.3).structural is None  # the user's field stays as given


def test_shortgpt_removes_whole_blocks(segments):
    model = tiny("llama")
    report = prune_llm(model, "shortgpt", 0.5, calibration=segments, progress=False)
    assert len(model.model.layers) == 1 and model.config.num_hidden_layers == 1
    assert len(report.removed_blocks) == 1


def test_shortgpt_removes_from_the_named_block_container(segments):
    """``blocks=`` reaches the removal (models whose blocks are not found alone)."""
    from secateurs.blocks import BlockDiscoveryError

    with pytest.raises(BlockDiscoveryError, match=r"model\.norm"):
        prune_llm(tiny("llama"), "shortgpt", 0.5, calibration=segments, blocks="model.norm", progress=False)
    model = tiny("llama")
    prune_llm(model, "shortgpt", 0.5, calibration=segments, blocks="model.layers", progress=False)
    assert len(model.model.layers) == 1


def test_shortgpt_refuses_a_sparsity_that_removes_no_block(segments):
    with pytest.raises(ConfigError, match=r"removes round\(0.1 x 2\) = 0"):
        prune_llm(tiny("llama"), "shortgpt", 0.1, calibration=segments, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "flap", "sparsity": 0.3, "pattern": "2:4"}, "removes whole structures"),
        ({"method": "shortgpt", "sparsity": 0.5, "allocation": "owl"}, "sizes weight tensors"),
        ({"method": "flap", "sparsity": 0.3, "method_options": {"x": 1}}, "bad method_options for 'flap'.*valid: none"),
        ({"method": "flap", "sparsity": 0.3, "seed": "1"}, "seed must be an integer"),
        ({"method": "shortgpt", "sparsity": 0.5, "blocks": 3}, "blocks must be a module name"),
        ({"method": "shortgpt", "sparsity": 0.5, "nsamples": 0}, "nsamples must be a positive integer"),
    ],
)
def test_structural_methods_refuse_options_that_do_not_apply(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LLMPruneConfig(**kwargs)


def test_flap_defaults_to_its_global_adaptive_ranking():
    assert LLMPruneConfig(method="flap", sparsity=0.2).allocation_.name == "global"
    assert LLMPruneConfig(method="flap", sparsity=0.2).solver_.name == "bias_compensation"
    assert LLMPruneConfig(method="wanda", sparsity=0.2).allocation_.name == "uniform"


def test_cli_flap_saves_a_loadable_directory_and_eval_reads_it(tmp_path, capsys):
    from secateurs.cli import main
    from secateurs.export import load_sparse

    from .conftest import TEXT, _tokenizer

    src = tmp_path / "tiny"
    tiny("llama").save_pretrained(src)
    _tokenizer(96).save_pretrained(src)
    calib = tmp_path / "c.txt"
    calib.write_text(TEXT)
    out = tmp_path / "out"
    args = ["prune", str(src), "--method", "flap", "--sparsity", "0.3", "--calib", str(calib),
            "--nsamples", "4", "--seqlen", "32", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert (out / "pruning_plan.json").is_file() and (out / "tokenizer.json").is_file()
    loaded = load_sparse(out)
    assert _params(loaded) < _params(tiny("llama"))
    assert main(["eval", str(out), "--ppl", str(calib), "--seqlen", "32"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0  # read through its plan, not a size-mismatch traceback
    assert f"1 removal step(s) replayed from {out}/pruning_plan.json" in capsys.readouterr().out
    # FLAP's layers differ in width and gain biases, which a stock config cannot describe: the plan says
    # so, and the directory holds per-layer sizes and a modeling file, so plain from_pretrained loads it
    from transformers import AutoModelForCausalLM

    plan = json.loads((out / "pruning_plan.json").read_text())
    assert plan["config_expressible"] is False and plan["variable_width"] is True
    assert _params(AutoModelForCausalLM.from_pretrained(out)) == _params(loaded)
