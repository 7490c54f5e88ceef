"""The CLI keeps every architecture's language-model head: each family the LLM runner supports,
with tied and with untied embeddings, saved to a directory, pruned by both CLI paths, reloaded."""

from __future__ import annotations

import pytest
import torch

from secateurs.cli import main
from secateurs.export import load_sparse

from .conftest import ARCHITECTURES, TEXT, _tokenizer, tiny

CASES = [(name, tied) for name in ARCHITECTURES for tied in (True, False)]


def _model(name: str, tied: bool) -> torch.nn.Module:
    model = tiny(name)
    model.config.tie_word_embeddings = tied
    model.config.get_text_config().tie_word_embeddings = tied
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if tied:
        head.weight = embeddings.weight
    else:  # an untied head with its own values: losing it, or re-initialising it, would show
        head.weight = torch.nn.Parameter(torch.randn_like(head.weight))
    return model


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize(("name", "tied"), CASES, ids=[f"{n}-{'tied' if t else 'untied'}" for n, t in CASES])
def test_prune_and_eval_keep_the_lm_head_of_every_supported_architecture(name, tied, tmp_path, calib, capsys):
    model = _model(name, tied)
    source = tmp_path / "model"
    model.save_pretrained(source)
    _tokenizer(96).save_pretrained(source)
    head = model.get_output_embeddings().weight.detach().clone()
    for path_name, extra in (("layerwise", ["--calib", str(calib), "--nsamples", "2", "--seqlen", "16"]),
                             ("whole-model", ["--mode", "bake"])):  # fmt: skip
        out = tmp_path / path_name
        args = ["prune", str(source), "--method", "magnitude", "--sparsity", "0.5", *extra, "--out", str(out)]
        assert main(args) == 0
        loaded = load_sparse(out)
        assert type(loaded) is type(model), f"{path_name}: saved as {type(loaded).__name__}"
        new_head = loaded.get_output_embeddings().weight
        tied_now = new_head is loaded.get_input_embeddings().weight
        assert tied_now == tied, f"{path_name}: tied={tied_now}"
        if not tied:  # the head is out of scope by default: exactly the user's values, not re-initialised
            torch.testing.assert_close(new_head, head, rtol=0, atol=0)
    if name != "bert":  # a masked LM has no left-to-right perplexity
        capsys.readouterr()
        assert main(["eval", str(tmp_path / "layerwise"), "--ppl", str(calib), "--seqlen", "16"]) == 0
        assert "windows of 16 tokens" in capsys.readouterr().out
