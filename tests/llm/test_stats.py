"""Statistics gathering: layers fed the same tensor share one accumulator."""

from __future__ import annotations

import pytest

from secateurs.llm import LLMPruneConfig
from secateurs.llm.blocks import capture_inputs
from secateurs.llm.runner import block_targets
from secateurs.llm.stats import Needs, gather

from .conftest import tiny


@pytest.mark.parametrize("needs", [Needs.HESSIAN, Needs.NORMS])
def test_projections_fed_the_same_input_share_one_accumulator(segments, needs):
    model = tiny("llama")
    _, blocks, groups = block_targets(model, LLMPruneConfig(method="sparsegpt", sparsity=0.5))
    inputs = capture_inputs(model, blocks, [segments[:4], segments[4:]])
    stats = gather(blocks[0], 0, groups[0], inputs, needs)
    owners = {name.rsplit(".", 2)[-2]: owner.rsplit(".", 2)[-2] for name, owner in stats.owner.items()}
    # q/k/v read the normed hidden state, gate/up the normed residual: 4 accumulators for 7 layers
    assert owners == {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj",
                      "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"}  # fmt: skip
    accumulators = stats.hessians if needs is Needs.HESSIAN else stats.norms
    assert (
        accumulators["model.layers.0.self_attn.k_proj.weight"] is accumulators["model.layers.0.self_attn.q_proj.weight"]
    )
    assert len({id(a) for a in accumulators.values()}) == 4
