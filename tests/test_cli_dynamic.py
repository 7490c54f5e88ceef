"""``secateurs dynamic``: calibrate, save, reuse, measure; bad arguments are refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from secateurs.cli import main
from test_docs import reader_folder

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = reader_folder(tmp_path_factory.mktemp("dynamic"))
    lines = (folder / "test.txt").read_text().splitlines(keepends=True)
    (folder / "short.txt").write_text("".join(lines[:40]))  # a few windows: perplexity in well under a second
    return folder


def _common(folder: Path) -> list[str]:
    return [str(folder / "my-llama"), "--nsamples", "4", "--seqlen", "32", "--allocation", "uniform"]


def test_calibrate_save_measure_and_reuse(folder, tmp_path, capsys, monkeypatch):
    from secateurs.dynamic import kernel

    monkeypatch.setattr(kernel, "_state", {"module": None, "notice": None})  # the reference path: no 35 s build
    out = tmp_path / "act.safetensors"
    code = main(["dynamic", *_common(folder), "--calib", str(folder / "calib.txt"), "--sparsity", "0.4",
                 "--levels", "0.25,0.5", "--ppl", str(folder / "short.txt"), "--out", str(out),
                 "--json", str(tmp_path / "curve.json")])  # fmt: skip
    assert code == 0 and out.is_file()
    printed = capsys.readouterr().out
    assert "| 50% |" in printed and "perplexity" in printed
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert [lv["sparsity"] for lv in curve["levels"]] == [0.0, 0.25, 0.5]
    ppl = [lv["quality"] for lv in curve["levels"]]
    from secateurs.dynamic import load_activation_sparsity
    from secateurs.llm import perplexity

    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "my-llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "my-llama")
    dense = perplexity(model, str(folder / "short.txt"), tokenizer, 32, progress=False).perplexity
    assert ppl[0] == pytest.approx(dense, rel=1e-6) and ppl[2] != ppl[0]  # level 0 is the dense model
    assert load_activation_sparsity(model, out).sparsity == pytest.approx(0.4)

    code = main(["dynamic", *_common(folder), "--thresholds", str(out), "--speed", "--tokens", "2", "--rounds", "1",
                 "--levels", "0.5"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "x (" in printed and "bytes-read limit" in printed


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "exactly one of --calib"),
        (["--calib", "calib.txt", "--sparsity", "1.0"], "activation sparsity must be"),
        (["--calib", "calib.txt", "--levels", "0.5,1.5"], "activation sparsity must be"),
        (["--calib", "calib.txt", "--json", "x.json"], "--ppl TEXT_FILE and/or --speed"),
        (["--calib", "calib.txt", "--speed", "--rounds", "0"], "must be positive"),
        (["--calib", "calib.txt", "--allocation", "greedy", "--max-sparsity", "0.6", "--levels", "0.7"], "above 0.600"),
    ],
)
def test_bad_arguments_are_refused_up_front(folder, extra, message, capsys, monkeypatch):
    monkeypatch.chdir(folder)
    assert main(["dynamic", *_common(folder), *extra]) == 2
    assert message in capsys.readouterr().err


def test_an_existing_output_is_kept_without_overwrite(folder, tmp_path, capsys):
    out = tmp_path / "act.safetensors"
    out.write_bytes(b"precious")
    assert main(["dynamic", *_common(folder), "--calib", str(folder / "calib.txt"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    torch.manual_seed(0)  # (the refusal came before any model was loaded)
