"""The sentence-pair tasks of ``bench/segment_pairs.py`` (MiniLM movement-pruning benchmark).

A benchmark's verdict is only as good as its task: labels must be balanced (chance is 50%), train
and dev must share no text, a seed must fix the pairs, and each label must mean what it says.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from segment_pairs import (
    BiEncoderClassifier,
    bi_batches,
    evaluate,
    pairs,
    same_section_pairs,
    segments,
    single_batches,
    word_order,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CALIB, TEST = DATA / "pydoc-calib.txt", DATA / "pydoc-test.txt"
needs_data = pytest.mark.skipif(not (CALIB.exists() and TEST.exists()), reason="needs /work/shared/data")


def _doc(tmp_path: Path, sections: int = 8, words: int = 60) -> Path:
    """Sections whose every word names its section (``s3w17``), so a pair's true label is readable."""
    text = []
    for s in range(sections):
        text += [f"Title {s}", "=" * 10, "", " ".join(f"s{s}w{w}" for w in range(words)), ""]
    path = tmp_path / "doc.txt"
    path.write_text("\n".join(text))
    return path


def _section(segment: str) -> int:
    return int(segment.split()[0][1:].split("w")[0])


@pytest.mark.parametrize("near", [0, 1, 3])
def test_same_section_labels_mean_what_they_say(tmp_path: Path, near: int) -> None:
    path = _doc(tmp_path)
    assert [len(s) for s in segments(path, 20)] == [3] * 8
    out = same_section_pairs(path, 200, 20, seed=0, near=near)
    for a, b, label in out:
        assert a != b
        if label:
            assert _section(a) == _section(b)
        else:
            assert _section(a) != _section(b)
            assert near == 0 or abs(_section(a) - _section(b)) <= near


def test_same_section_refuses_negative_near(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="near must be >= 0"):
        same_section_pairs(_doc(tmp_path), 10, 20, seed=0, near=-1)


def test_word_order_labels_mean_what_they_say(tmp_path: Path) -> None:
    path = _doc(tmp_path)
    real = {seg for section in segments(path, 20) for seg in section}
    out = word_order(path, 200, 20, seed=0)
    assert Counter(y for _, y in out) == {0: 100, 1: 100}
    assert out == word_order(path, 200, 20, seed=0) and out != word_order(path, 200, 20, seed=1)
    for text, label in out:
        if label:
            assert text in real
        else:  # the words of one real segment, in another order
            assert text not in real
            assert any(sorted(text.split()) == sorted(seg.split()) for seg in real)


@needs_data
def test_word_order_balanced_and_train_dev_disjoint() -> None:
    train, dev = word_order(CALIB, 400, 20, 0), word_order(TEST, 400, 20, 1000)
    assert Counter(y for _, y in train) == Counter(y for _, y in dev) == {0: 200, 1: 200}
    train_words = {" ".join(sorted(t.split())) for t, _ in train}
    assert not train_words & {" ".join(sorted(t.split())) for t, _ in dev}  # not even as a permutation


@needs_data
@pytest.mark.parametrize("make", ["same_section", "adjacent"])
def test_balanced_deterministic_and_train_dev_disjoint(make: str) -> None:
    build = (lambda p, n, s: same_section_pairs(p, n, 20, s, 3)) if make == "same_section" else (
        lambda p, n, s: pairs(p, n, 20, s))  # fmt: skip
    train, dev = build(CALIB, 400, 0), build(TEST, 400, 1000)
    assert Counter(y for *_, y in train) == Counter(y for *_, y in dev) == {0: 200, 1: 200}
    assert build(CALIB, 400, 0) == train
    assert build(CALIB, 400, 1) != train
    train_text = {t for a, b, _ in train for t in (a, b)}
    assert not train_text & {t for a, b, _ in dev for t in (a, b)}
    # not only the sampled pairs: no segment of one file occurs in the other
    calib_segments = {s for sec in segments(CALIB, 20) for s in sec}
    assert not calib_segments & {s for sec in segments(TEST, 20) for s in sec}


@pytest.mark.slow  # importing transformers alone takes seconds on the shared machine
def test_bi_encoder_batches_and_classifier(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({f"s{s}w{i}" for s in range(8) for i in range(60)})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), do_lower_case=False)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)  # fmt: skip
    model = BiEncoderClassifier(BertModel(config), seed=0)
    data = same_section_pairs(_doc(tmp_path), 10, 20, seed=0, near=0)
    batch = bi_batches(tokenizer, data, 4, max_length=64)
    assert [len(b["labels"]) for b in batch] == [4, 4, 2]
    assert set(batch[0]) == {"labels", "a_input_ids", "a_attention_mask", "b_input_ids", "b_attention_mask"}
    assert batch[0]["a_input_ids"].shape == (4, 22)  # [CLS], 20 words, [SEP]: no word was split or lost
    single = single_batches(tokenizer, word_order(_doc(tmp_path), 6, 20, seed=0), 4, max_length=64)
    assert set(single[0]) == {"labels", "input_ids", "attention_mask"} and single[0]["input_ids"].shape == (4, 22)
    out = model(**batch[0])
    assert out["logits"].shape == (4, 2) and torch.isfinite(out["loss"])
    result = evaluate(model, batch)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["loss"] > 0
