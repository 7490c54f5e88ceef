"""Compressed checkpoints are checked before they are trusted: a checksum per tensor, bounds on
every header value before anything is allocated, and typed errors for truncated or corrupted
files; loading into a model is all or nothing."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import secateurs
from conftest import assert_unchanged, fingerprint
from secateurs.errors import CheckpointError
from secateurs.export import load_compressed, load_compressed_into, save_compressed
from secateurs.patterns import NM


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    secateurs.prune(model, "magnitude", 0.5, pattern="2:4", mode="bake", progress=False)
    return model


@pytest.fixture
def saved(tmp_path):
    model = _model()
    path = tmp_path / "m.safetensors"
    size = save_compressed(model, path, NM(2, 4))
    assert size.formats["n:m"] == 2
    return model, path


def _header(path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def _payload_offset(path, key: str) -> int:
    n, header = _header(path)
    start, end = header[key]["data_offsets"]
    return 8 + n + (start + end) // 2


def _flip(path, offset: int, bit: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


def _rewrite_metadata(path, edit) -> None:
    """Rewrite the checkpoint with edited metadata (what a crafted file would hold)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
        metadata = dict(f.metadata())
    entries = json.loads(metadata["tensors"])
    edit(entries, tensors)
    metadata["tensors"] = json.dumps(entries)
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("part", ["0.weight::values", "0.weight::indices", "4.weight::bitmask", "0.bias::dense"])
def test_a_flipped_byte_in_any_payload_is_refused_by_its_checksum(saved, part):
    _, path = saved
    if part not in _header(path)[1]:
        part = part.replace("bitmask", "dense")
    _flip(path, _payload_offset(path, part), bit=3)
    with pytest.raises(CheckpointError, match=r"checksum|index outside|bits set"):
        load_compressed(path)


def test_a_crafted_huge_shape_is_refused_before_allocating(saved):
    _, path = saved

    def huge(entries, tensors):
        entries["0.bias"]["shape"] = [10**12]

    _rewrite_metadata(path, huge)
    with pytest.raises(CheckpointError, match=r"'0.bias'.*shape \[32\], expected \[1000000000000\]"):
        load_compressed(path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda e, t: e["0.bias"].update(dtype="load"), "unsupported dtype 'load'"),
        (lambda e, t: e["0.bias"].update(format="pickle"), "unknown format"),
        (lambda e, t: e["0.bias"].update(shape=[-16]), "invalid shape"),
        (lambda e, t: e["0.bias"].update(shape="16"), "invalid shape"),
        (lambda e, t: e["0.weight"].update(m=2**20), "invalid N:M pattern"),
        (lambda e, t: e["0.weight"].update(n=4), "invalid N:M pattern"),
        (lambda e, t: e["0.weight"].update(layout="diagonal"), "invalid layout"),
        (lambda e, t: e["0.bias"].pop("sha256"), "no valid sha256"),
        (lambda e, t: e.pop("0.bias"), "no entry refers to"),
        (lambda e, t: t.pop("0.weight::indices"), "no stored part 'indices'"),
        (lambda e, t: t.update({"0.weight::values": t["0.weight::values"][:-2]}), "expected \\[256\\]"),
    ],
    ids=["dtype", "format", "negative-shape", "string-shape", "huge-m", "n-not-below-m", "layout", "checksum",
         "orphan-part", "missing-part", "short-values"],
)  # fmt: skip
def test_every_header_value_is_checked_before_use(saved, edit, match):
    _, path = saved
    _rewrite_metadata(path, edit)
    with pytest.raises(CheckpointError, match=match):
        load_compressed(path)


@pytest.mark.parametrize("keep", [0, 7, 100, -1])
def test_truncated_files_give_a_typed_error(saved, keep):
    _, path = saved
    raw = path.read_bytes()
    path.write_bytes(raw[:keep] if keep >= 0 else raw[:-1])
    with pytest.raises(CheckpointError, match=r"truncated|corrupted|not a readable"):
        load_compressed(path)


def test_a_missing_file_is_a_typed_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_compressed(tmp_path / "nope.safetensors")


def test_loading_into_a_model_of_another_shape_leaves_it_untouched(saved):
    _, path = saved
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    before = fingerprint(other)
    with pytest.raises(CheckpointError, match=r"shape mismatch 4.weight: file \(4, 16\) vs model \(8, 16\)"):
        load_compressed_into(other, path)
    assert_unchanged(other, before)  # the layers that did fit were not written either


def test_loading_into_a_model_with_other_names_leaves_it_untouched(saved):
    _, path = saved
    other = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 4))
    before = fingerprint(other)
    with pytest.raises(CheckpointError, match=r"missing 5.bias, 5.weight"):
        load_compressed_into(other, path)
    assert_unchanged(other, before)


def test_a_corrupted_tensor_leaves_the_model_untouched(saved):
    _, path = saved
    _flip(path, _payload_offset(path, "2.weight::values"))
    target = _model(seed=3)
    before = fingerprint(target)
    with pytest.raises(CheckpointError, match="checksum"):
        load_compressed_into(target, path)
    assert_unchanged(target, before)


def test_the_round_trip_is_still_exact(saved):
    model, path = saved
    target = _model(seed=3)
    load_compressed_into(target, path)
    for key, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(min_value=0), bit=st.integers(0, 7))
def test_any_flipped_bit_is_refused_or_harmless(saved, offset, bit):
    """Flip one bit anywhere (header or payload): a typed refusal, or exactly the saved tensors."""
    model, path = saved
    original = path.read_bytes()
    try:
        _flip(path, offset % len(original), bit)
        try:
            state = load_compressed(path)
        except CheckpointError:
            return
        for key, value in model.state_dict().items():
            assert torch.equal(state[key].view(torch.uint8), value.contiguous().view(torch.uint8)), key
    finally:
        path.write_bytes(original)
