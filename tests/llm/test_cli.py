"""`secateurs prune <hf-dir> --calib ...` and `secateurs eval`: what a user types, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from secateurs.cli import main
from secateurs.export import SPARSE_FILE, load_sparse

from .conftest import TEXT, assert_same_bits, state_bits


def test_prune_sparsegpt_writes_hf_and_compressed_checkpoints(model_dir, calib, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prune", str(model_dir), "--method", "sparsegpt", "--sparsity", "0.5", "--calib", str(calib),
            "--nsamples", "8", "--seqlen", "32", "--format", "both", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "50.00% sparse" in printed and "x smaller" in printed
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", SPARSE_FILE, "report.json", "recipe.json", "tokenizer.json"} <= names
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.5)
    assert report["details"]["calibration"] == {"nsamples": 8, "seqlen": 32}
    dense = load_sparse(out)
    assert_same_bits(state_bits(load_sparse(out, prefer="compressed")), state_bits(dense))


def test_prune_two_four_with_a_recipe_and_then_eval(model_dir, calib, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: wanda\npattern: '2:4'\nnsamples: 4\nseqlen: 32\n")
    out = tmp_path / "out"
    assert main(["prune", str(model_dir), "--recipe", str(recipe), "--calib", str(calib), "--out", str(out),
                 "--format", "compressed"]) == 0  # fmt: skip
    assert not (out / "model.safetensors").exists()
    capsys.readouterr()
    results = tmp_path / "ppl.json"
    assert main(["eval", str(out), "--ppl", str(calib), "--seqlen", "32", "--json", str(results)]) == 0
    assert "perplexity" in capsys.readouterr().out
    ppl = json.loads(results.read_text())["perplexity"][str(calib)]
    assert ppl["windows"] > 10 and ppl["perplexity"] > 1


def test_recipe_json_written_by_prune_is_a_valid_recipe(model_dir, calib, tmp_path):
    out = tmp_path / "out"
    args = ["prune", str(model_dir), "--method", "wanda", "--sparsity", "0.6", "--owl", "--owl-lambda", "0.1",
            "--calib", str(calib), "--nsamples", "4", "--seqlen", "32", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    again = tmp_path / "again"
    assert main(["prune", str(model_dir), "--recipe", str(out / "recipe.json"), "--calib", str(calib),
                 "--out", str(again)]) == 0  # fmt: skip
    assert_same_bits(state_bits(load_sparse(again)), state_bits(load_sparse(out)))


def test_allocation_sensitivity_without_a_profile_measures_blocks_and_writes_the_profile(model_dir, calib, tmp_path):
    out = tmp_path / "out"
    common = ["prune", str(model_dir), "--sparsity", "0.6", "--calib", str(calib), "--nsamples", "4", "--seqlen", "32"]
    assert main([*common, "--allocation", "sensitivity", "--grid", "0.4,0.6,0.8", "--out", str(out)]) == 0
    profile = json.loads((out / "sensitivity_profile.json").read_text())
    assert profile["metric"] == "local_error" and [e["kind"] for e in profile["entries"]] == ["block", "block"]
    again = tmp_path / "again"
    assert main([*common, "--profile", str(out / "sensitivity_profile.json"), "--out", str(again)]) == 0
    assert_same_bits(state_bits(load_sparse(again)), state_bits(load_sparse(out)))


def test_an_existing_output_is_refused_before_pruning(model_dir, calib, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    args = ["prune", str(model_dir), "--method", "wanda", "--sparsity", "0.5", "--calib", str(calib), "--out", str(out)]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_calibration_shorter_than_one_segment_is_a_clear_error(model_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    args = ["prune", str(model_dir), "--method", "wanda", "--sparsity", "0.5", "--calib", str(short),
            "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "tokens, but one segment needs seqlen=64" in err and "Traceback" not in err


def test_a_hub_id_without_network_suggests_a_local_path(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, as with no network
    calib = tmp_path / "c.txt"
    calib.write_text(TEXT)
    args = ["prune", "some-org/some-llm", "--method", "sparsegpt", "--sparsity", "0.5", "--calib", str(calib),
            "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(args) == 2
    assert "local directory" in capsys.readouterr().err


def test_sparsegpt_without_calibration_says_to_add_it(model_dir, tmp_path, capsys):
    args = ["prune", str(model_dir), "--method", "sparsegpt", "--sparsity", "0.5", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "--calib" in capsys.readouterr().err


def test_flags_that_do_not_apply_are_refused(model_dir, calib, tmp_path, capsys):
    args = ["prune", str(model_dir), "--method", "wanda", "--sparsity", "0.5", "--calib", str(calib),
            "--data", "my.data:batches", "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(args) == 2
    assert "--data feeds a factory-built model" in capsys.readouterr().err
    args = ["prune", str(model_dir), "--method", "taylor", "--sparsity", "0.5", "--calib", str(calib),
            "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(args) == 2
    assert "runner 'blocks' cannot gather" in capsys.readouterr().err


def test_magnitude_masks_on_a_hf_directory_need_no_calibration(model_dir, tmp_path):
    out = tmp_path / "out"
    args = ["prune", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--mode", "mask", "--out", str(out)]
    assert main(args) == 0
    assert (out / "masks.safetensors").is_file()  # mask mode through the block runner: the masks are saved too
    assert (out / "tokenizer.json").is_file()  # so `secateurs eval` works on the output as is
    assert main(["eval", str(out), "--ppl", str(model_dir / "config.json"), "--seqlen", "16"]) == 0


def test_eval_refuses_an_existing_json_before_evaluating(model_dir, calib, tmp_path, capsys, monkeypatch):
    import sys

    ppl = sys.modules["secateurs.llm.perplexity"]  # the package re-exports a function of the same name
    existing = tmp_path / "results.json"
    existing.write_text("keep me")
    monkeypatch.setattr(ppl, "perplexity", lambda *a, **k: pytest.fail("evaluated before refusing the output"))
    assert main(["eval", str(model_dir), "--ppl", str(calib), "--json", str(existing)]) == 2
    assert "--overwrite" in capsys.readouterr().err and existing.read_text() == "keep me"


def test_eval_without_anything_to_evaluate_is_refused(model_dir, capsys):
    assert main(["eval", str(model_dir)]) == 2
    assert "--ppl" in capsys.readouterr().err


def test_eval_of_the_dense_model_matches_the_api(model_dir, calib, capsys):
    from secateurs.llm import perplexity

    assert main(["eval", str(model_dir), "--ppl", str(calib), "--seqlen", "32"]) == 0
    printed = capsys.readouterr().out
    expected = perplexity(load_sparse(model_dir), str(calib), _tokenizer_of(model_dir), seqlen=32, progress=False)
    assert f"{expected.perplexity:.4f}" in printed
    torch.manual_seed(0)


def _tokenizer_of(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("flag", [["--cloze", "text.txt"], ["--tasks", "arc_easy"]])
def test_a_missing_lm_eval_is_reported_before_the_model_is_loaded(model_dir, flag, capsys, monkeypatch):
    import sys

    import secateurs.export

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: importing it raises ImportError
    monkeypatch.setattr(secateurs.export, "load_sparse", lambda *a, **k: pytest.fail("loaded the model first"))
    assert main(["eval", str(model_dir), *flag]) == 2
    assert "pip install 'lm-eval[hf]'" in capsys.readouterr().err


def _weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def test_the_default_output_is_the_compressed_checkpoint_smaller_than_the_input(model_dir, calib, tmp_path):
    out = tmp_path / "out"
    args = ["prune", str(model_dir), "--method", "wanda", "--sparsity", "0.5", "--calib", str(calib),
            "--nsamples", "4", "--seqlen", "32", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert (out / SPARSE_FILE).is_file() and not list(out.glob("model*.safetensors"))
    assert _weight_bytes(out) < _weight_bytes(model_dir)
    model = load_sparse(out)  # the loader for it
    assert float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == pytest.approx(0.5)


def test_format_hf_is_what_plain_from_pretrained_loads(model_dir, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    args = ["prune", str(model_dir), "--method", "wanda", "--sparsity", "0.5", "--calib", str(calib),
            "--nsamples", "4", "--seqlen", "32", "--format", "hf", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert not (out / SPARSE_FILE).exists()
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert_same_bits(state_bits(plain), state_bits(load_sparse(out)))
