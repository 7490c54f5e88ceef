"""Compressed sparse checkpoints: bit-exact round trips, formats chosen, sizes, saved directories."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secateurs.export import SPARSE_FILE, load_compressed, load_sparse, save_compressed, save_sparse
from secateurs.io import OutputExistsError
from secateurs.llm import prune_llm
from secateurs.patterns import NM

from .conftest import assert_same_bits, state_bits, tiny


@pytest.mark.parametrize("pattern", ["element", "2:4", "4:8"])
def test_compressed_checkpoint_round_trips_bit_exact(any_model, pattern, segments, tmp_path):
    arch, model = any_model
    sparsity = 0.5 if pattern == "element" else None
    prune_llm(model, "sparsegpt", sparsity, pattern=pattern, calibration=segments, progress=False)
    nm = None if pattern == "element" else NM(*map(int, pattern.split(":")))
    size = save_compressed(model, tmp_path / "m.safetensors", nm)
    fresh = tiny(arch, seed=1)
    fresh.load_state_dict(load_compressed(tmp_path / "m.safetensors"))
    assert_same_bits(state_bits(fresh), state_bits(model))
    assert size.formats["n:m" if nm else "bitmask"] >= 8
    assert size.file_bytes < size.dense_bytes


def test_negative_zero_and_ties_survive_bit_exact(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-0.0, 1, 0, 0, 2, 0, 0, 0]] * 4))
    save_compressed(model, tmp_path / "z.safetensors", NM(2, 4))
    restored = load_compressed(tmp_path / "z.safetensors")["0.weight"]
    assert torch.equal(restored.view(torch.int32), model[0].weight.detach().view(torch.int32))


def test_n_m_groups_lie_along_the_input_dimension_of_conv1d(segments, tmp_path):
    model = tiny("gpt2")
    prune_llm(model, "wanda", pattern="2:4", calibration=segments, progress=False)
    size = save_compressed(model, tmp_path / "g.safetensors", NM(2, 4))
    assert size.formats["n:m"] == 8  # c_attn, c_proj, c_fc, mlp.c_proj of two blocks
    restored = load_compressed(tmp_path / "g.safetensors")
    w = model.transformer.h[0].mlp.c_fc.weight  # Conv1D stores (in, out)
    assert torch.equal(restored["transformer.h.0.mlp.c_fc.weight"], w)


def test_unstructured_50_percent_is_about_a_third_smaller_than_dense(segments, tmp_path):
    model = tiny("llama")
    prune_llm(model, "magnitude", 0.5, progress=False)
    size = save_compressed(model, tmp_path / "l.safetensors")
    layer = 32 * 64 * 4
    # per pruned fp32 layer: half the values + 1 bit per entry = 0.5 + 1/32 of dense
    assert size.formats["bitmask"] == 14
    assert size.dense_bytes - size.file_bytes > 14 * 0.9 * (0.5 - 1 / 32) * layer // 2


def test_tied_weights_are_stored_once(tmp_path):
    model = tiny("gpt2")  # lm_head is tied to the token embedding
    size = save_compressed(model, tmp_path / "t.safetensors")
    state = load_compressed(tmp_path / "t.safetensors")
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    assert size.dense_bytes < sum(v.numel() * v.element_size() for v in model.state_dict().values())


def test_saved_directory_loads_from_either_format(segments, tmp_path):
    model = tiny("llama")
    prune_llm(model, "wanda", pattern="2:4", calibration=segments, progress=False)
    saved = save_sparse(model, tmp_path / "out", format="both", pattern=NM(2, 4), extra_files={"report.json": "{}"})
    assert (tmp_path / "out" / SPARSE_FILE).is_file() and (tmp_path / "out" / "report.json").is_file()
    assert saved.compressed.ratio > 1.3  # embeddings and norms stay dense
    for prefer in ("auto", "compressed"):
        loaded = load_sparse(tmp_path / "out", prefer=prefer)
        assert_same_bits(state_bits(loaded), state_bits(model))


def test_compressed_only_directory_has_no_dense_weights(tmp_path):
    model = tiny("opt")
    save_sparse(model, tmp_path / "c", format="compressed")
    assert not list((tmp_path / "c").glob("model*.safetensors"))
    assert_same_bits(state_bits(load_sparse(tmp_path / "c")), state_bits(model))


def test_an_existing_directory_is_refused_without_overwrite(tmp_path):
    model = tiny("llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite"):
        save_sparse(model, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    save_sparse(model, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 6),
    m=st.sampled_from([4, 8]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_any_sparse_weight_round_trips_bit_exact(tmp_path_factory, rows, groups, m, dtype, density, seed):
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(groups * m, rows, bias=False)
    with torch.no_grad():
        w = torch.randn(rows, groups * m, generator=g)
        w[torch.rand(w.shape, generator=g) > density] = 0.0
        w[torch.rand(w.shape, generator=g) < 0.05] = -0.0
        layer.weight.copy_(w)
    model = torch.nn.Sequential(layer.to(dtype))
    nm = NM(m // 2, m)
    path = tmp_path_factory.mktemp("h") / "w.safetensors"
    save_compressed(model, path, nm)
    restored = load_compressed(path)["0.weight"]
    assert restored.dtype == dtype
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    assert torch.equal(restored.view(bits), model[0].weight.detach().view(bits))
