"""Statistics gathering: layers fed the same tensor share one accumulator."""

from __future__ import annotations

import pytest

from secateurs.blocks import capture_inputs
from secateurs.evidence import Need, StatsCollector, gather_block
from secateurs.llm import LLMPruneConfig
from secateurs.runners.blocks import block_targets

from .conftest import tiny


@pytest.mark.parametrize("need", [Need.HESSIAN, Need.ACTIVATIONS])
def test_projections_fed_the_same_input_share_one_accumulator(segments, need):
    model = tiny("llama")
    _, blocks, targets, _ = block_targets(model, LLMPruneConfig(method="sparsegpt", sparsity=0.5))
    first = [t for t in targets if any(t.module is m for m in blocks[0].modules())]
    inputs = capture_inputs(model, blocks, [segments[:4], segments[4:]])
    activations, hessians = gather_block(blocks[0], 0, first, inputs, frozenset({need}))
    inputs_of = {name: stats.inputs for name, stats in activations.items()}
    accumulators = hessians if need is Need.HESSIAN else inputs_of
    short = {name.rsplit(".", 2)[-2]: id(a) for name, a in accumulators.items()}
    # q/k/v read the normed hidden state, gate/up the normed residual: 4 accumulators for 7 layers
    assert short["q_proj"] == short["k_proj"] == short["v_proj"] != short["o_proj"]
    assert short["gate_proj"] == short["up_proj"] != short["down_proj"]
    assert len(set(short.values())) == 4


def test_a_layer_called_twice_keeps_its_own_accumulator_over_both_calls():
    """A module run twice per batch (weight sharing) never shares with a layer that saw only one of its
    inputs: sharing is decided on the whole first batch, not on the first call."""
    import torch
    from torch import nn

    from secateurs.layout import Layout
    from secateurs.scope import Target

    shared, other = nn.Linear(4, 4), nn.Linear(4, 4)
    targets = [Target("shared", shared, Layout.LINEAR), Target("other", other, Layout.LINEAR)]
    x, y = torch.randn(3, 4), torch.randn(5, 4)
    with StatsCollector(targets, frozenset({Need.HESSIAN})) as collector:
        for _ in range(2):
            shared(x), other(x), shared(y)
            collector.end_batch()
    _, hessians = collector.result()
    assert hessians["shared.weight"] is not hessians["other.weight"]
    assert hessians["shared.weight"].positions == 2 * (3 + 5)
    torch.testing.assert_close(hessians["other.weight"].hessian, 2 * x.t() @ x / 3)
