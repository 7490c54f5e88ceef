"""Calibration segments: every source type, seeded determinism, literature defaults, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from secateurs.calibration import CalibrationError, default_seqlen, sample_segments


class CharTokenizer:
    """One id per character: enough to test text handling without a real vocabulary."""

    model_max_length = 10**9

    def __call__(self, text: str, verbose: bool = True) -> dict:
        return {"input_ids": [ord(c) % 96 for c in text]}


class FakeDataset:
    """What the code relies on from ``datasets.Dataset``: column names and column access."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.column_names = ["text"]

    def __getitem__(self, key: str) -> list[str]:
        return self.texts


TEXT = "".join(f"line {i}: the quick brown fox\n" for i in range(200))


def test_same_seed_gives_the_same_segments_and_another_seed_others():
    stream = torch.arange(10_000)
    a = sample_segments(stream, nsamples=16, seqlen=64, seed=0)
    b = sample_segments(stream, nsamples=16, seqlen=64, seed=0)
    c = sample_segments(stream, nsamples=16, seqlen=64, seed=1)
    assert a.shape == (16, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # contiguous windows of the stream


def test_text_file_string_list_and_dataset_give_the_same_tokens(tmp_path: Path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    tok = CharTokenizer()
    from_path = sample_segments(str(path), tok, nsamples=4, seqlen=32)
    assert torch.equal(from_path, sample_segments(path, tok, nsamples=4, seqlen=32))
    assert torch.equal(from_path, sample_segments([TEXT], tok, nsamples=4, seqlen=32))
    assert torch.equal(from_path, sample_segments(FakeDataset([TEXT]), tok, nsamples=4, seqlen=32))


def test_several_files_are_joined(tmp_path: Path):
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for f in files:
        f.write_text(TEXT)
    joined = sample_segments(files, CharTokenizer(), nsamples=2, seqlen=16)
    assert joined.shape == (2, 16)


def test_ready_segments_pass_through_cut_to_length():
    ready = torch.randint(0, 50, (10, 40))
    out = sample_segments(ready, nsamples=4, seqlen=32)
    assert torch.equal(out, ready[:4, :32])


def test_text_shorter_than_one_segment_is_refused_with_the_numbers(tmp_path: Path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 100)
    with pytest.raises(CalibrationError, match=r"has 100 tokens, but one segment needs seqlen=2048"):
        sample_segments(str(path), CharTokenizer(), nsamples=128, seqlen=2048)


def test_a_missing_file_is_refused():
    with pytest.raises(CalibrationError, match="does not exist"):
        sample_segments("no/such/file.txt", CharTokenizer(), nsamples=2, seqlen=8)


def test_a_dataset_without_the_text_column_is_refused():
    data = FakeDataset([TEXT])
    data.column_names = ["content"]
    with pytest.raises(CalibrationError, match="no 'text' column"):
        sample_segments(data, CharTokenizer(), nsamples=2, seqlen=8)


def test_float_tensors_are_refused():
    with pytest.raises(CalibrationError, match="integer"):
        sample_segments(torch.randn(4, 8), nsamples=2, seqlen=8)


def test_default_length_is_2048_capped_to_the_context(llama):
    assert default_seqlen(llama) == 64
    assert default_seqlen(None) == 2048


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_counts_must_be_positive_integers(bad):
    from secateurs import ConfigError

    with pytest.raises(ConfigError, match="positive integer"):
        sample_segments(torch.arange(100), nsamples=bad, seqlen=8)


def test_raw_text_passed_as_a_path_gets_the_clear_error_not_an_os_error():
    from secateurs.calibration import CalibrationError, token_stream

    with pytest.raises(CalibrationError, match="pass raw text as a list of strings"):
        token_stream("word " * 2000)
