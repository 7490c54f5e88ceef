"""Patterns cut weights into units and put masks back; selection over them is exact."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secateurs.errors import PatternError
from secateurs.patterns import NM, Block, Element, InputChannel, OutputChannel, parse_pattern
from secateurs.selection import keep_mask

shapes = st.tuples(st.integers(1, 6), st.integers(1, 3), st.integers(1, 6))


def _select(pattern, scores3, sparsity, comparison="layer"):
    units = pattern.units(scores3, comparison)
    keep = keep_mask(units, pattern.units_to_prune(units.shape[1], sparsity))
    return units, keep, pattern.expand(keep, tuple(scores3.shape), comparison)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, sparsity=st.floats(0, 0.99), comparison=st.sampled_from(["layer", "row"]), seed=st.integers(0, 99))
def test_element_sparsity_is_exact_in_every_comparison_group(shape, sparsity, comparison, seed):
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    units, keep, mask = _select(Element(), scores, sparsity, comparison)
    expected = round(sparsity * units.shape[1])
    assert ((~keep).sum(dim=1) == expected).all()
    assert int((~mask).sum()) == expected * units.shape[0]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5), spatial=st.integers(1, 3), chunks=st.integers(1, 5),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8)]), seed=st.integers(0, 99),
)  # fmt: skip
def test_nm_masks_keep_exactly_n_of_every_m_along_the_input(rows, spatial, chunks, nm, seed):
    n, m = nm
    scores = torch.rand(rows, spatial, chunks * m, generator=torch.Generator().manual_seed(seed))
    pattern = NM(n, m)
    _, _, mask = _select(pattern, scores, 0.0)
    assert (mask.reshape(-1, m).sum(dim=1) == n).all()
    assert pattern.is_valid(mask)
    # and the survivors are the top-n of each chunk
    chunk_scores = scores.reshape(-1, m)
    kept_min = chunk_scores.masked_fill(~mask.reshape(-1, m), float("inf")).amin(dim=1)
    pruned_max = chunk_scores.masked_fill(mask.reshape(-1, m), float("-inf")).amax(dim=1)
    assert (kept_min >= pruned_max).all()


@settings(max_examples=40, deadline=None)
@given(bh=st.integers(1, 3), bw=st.integers(1, 3), gh=st.integers(1, 4), gw=st.integers(1, 4),
       spatial=st.integers(1, 2), sparsity=st.floats(0, 0.95), seed=st.integers(0, 99))  # fmt: skip
def test_block_masks_are_whole_blocks_at_exact_sparsity(bh, bw, gh, gw, spatial, sparsity, seed):
    scores = torch.rand(bh * gh, spatial, bw * gw, generator=torch.Generator().manual_seed(seed))
    pattern = Block(bh, bw)
    units, keep, mask = _select(pattern, scores, sparsity)
    assert pattern.is_valid(mask)
    assert int((~keep).sum()) == round(sparsity * units.shape[1])
    assert int((~mask).sum()) == round(sparsity * units.shape[1]) * bh * bw


def test_output_channel_prunes_whole_rows_by_reduced_score():
    scores = torch.tensor([[[1.0, 1.0]], [[5.0, 0.0]], [[0.1, 0.2]], [[3.0, 3.0]]])
    _, _, mask = _select(OutputChannel(), scores, 0.5)
    assert mask[:, 0, 0].tolist() == [False, True, False, True]
    assert OutputChannel().is_valid(mask)


def test_input_channel_prunes_whole_columns():
    scores = torch.tensor([[[1.0, 9.0, 0.5]], [[1.0, 9.0, 0.5]]])
    _, _, mask = _select(InputChannel(), scores, 1 / 3)
    assert mask[0, 0].tolist() == [True, True, False]
    assert InputChannel().is_valid(mask) and not InputChannel().is_valid(torch.eye(3).bool().unsqueeze(1))


def test_ties_break_by_index_so_selection_is_deterministic():
    keep = keep_mask(torch.ones(1, 6), 3)
    assert keep.tolist() == [[False, False, False, True, True, True]]


def test_already_pruned_units_are_pruned_first_and_counted():
    dead = torch.tensor([[False, False, False, True]])
    keep = keep_mask(torch.tensor([[1.0, 2.0, 3.0, 9.0]]), 2, dead)
    assert keep.tolist() == [[False, True, True, False]]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("element", Element()), ("2:4", NM(2, 4)), (" 4 : 8 ", NM(4, 8)), ("block:4x2", Block(4, 2)),
     ({"block": [2, 2]}, Block(2, 2)), ("channel", OutputChannel()), ("input_channel", InputChannel())],
)  # fmt: skip
def test_parse_pattern_accepts_the_documented_spellings(text, expected):
    assert parse_pattern(text) == expected
    assert parse_pattern(parse_pattern(text).spec()) == expected


@pytest.mark.parametrize("bad", ["4:4", "5:4", "0:4", "diagonal", "block:0x2"])
def test_parse_pattern_refuses_invalid_patterns_with_the_valid_ones(bad):
    with pytest.raises(PatternError, match=r"N:M|valid|positive"):
        parse_pattern(bad)


def test_nm_check_names_the_weight_and_its_input_size():
    with pytest.raises(PatternError, match=r"fc\.weight.*divisible by 4.*6"):
        NM(2, 4).check("fc.weight", (3, 1, 6), "layer")


def test_block_check_says_what_does_not_tile():
    with pytest.raises(PatternError, match=r"does not tile conv\.weight"):
        Block(4, 4).check("conv.weight", (6, 9, 8), "layer")


def _reference_keep(scores, k, dead):
    """The definition: stable ascending sort, dead first, prune max(k, #dead) per row."""
    filled = scores.masked_fill(dead, float("-inf"))
    order = torch.sort(filled, dim=1, stable=True).indices
    keep = torch.ones_like(scores, dtype=torch.bool)
    for row in range(scores.shape[0]):
        n = max(k, int(dead[row].sum()))
        keep[row, order[row, :n]] = False
    return keep


@settings(max_examples=100, deadline=None)
@given(
    groups=st.integers(1, 4), units=st.integers(1, 12), k=st.integers(0, 12), levels=st.integers(1, 4),
    dead_rate=st.floats(0, 0.6), seed=st.integers(0, 999),
)  # fmt: skip
def test_fast_selection_equals_a_stable_sort_with_ties_and_dead_units(groups, units, k, levels, dead_rate, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (groups, units), generator=g).float()  # few levels: many ties
    dead = torch.rand(groups, units, generator=g) < dead_rate
    k = min(k, units)
    assert torch.equal(keep_mask(scores, k, dead), _reference_keep(scores, k, dead))


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4), sparsity=st.floats(0, 0.99),
       levels=st.integers(1, 5), seed=st.integers(0, 999))  # fmt: skip
def test_global_counts_equal_a_stable_sort_of_all_scores(sizes, sparsity, levels, seed):
    from secateurs.selection import global_prune_counts

    g = torch.Generator().manual_seed(seed)
    scores = {f"t{i}": torch.randint(0, levels, (1, n), generator=g).float() for i, n in enumerate(sizes)}
    dead = {name: torch.rand(s.shape, generator=g) < 0.2 for name, s in scores.items()}
    counts = global_prune_counts(scores, dict.fromkeys(scores, 1), dead, sparsity)
    flat = torch.cat([s.masked_fill(dead[n], float("-inf")).reshape(-1) for n, s in scores.items()])
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores.values())])
    n_dead = sum(int(d.sum()) for d in dead.values())
    cut = max(round(sparsity * flat.numel()), n_dead)
    expected = torch.bincount(owner[torch.sort(flat, stable=True).indices[:cut]], minlength=len(scores))
    assert list(counts.values()) == expected.tolist()
