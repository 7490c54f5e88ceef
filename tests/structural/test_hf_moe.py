"""Channels inside transformers' fused experts (Mixtral, Qwen2-MoE): neuron positions leave every
expert at once, in blocks the grouped-GEMM kernels accept; routers keep every expert."""

from __future__ import annotations

import pytest

from secateurs import hf_zoo
from secateurs.structural import DependencyGraph
from secateurs.structural.hf_moe import BLOCK

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _build(model_type: str):
    return hf_zoo.build(next(a for a in hf_zoo.architectures() if a.model_type == model_type))


def test_expert_neurons_are_units_of_whole_blocks_shared_by_every_expert():
    model = _build("mixtral")
    graph = DependencyGraph(model, hf_zoo.inputs(model))
    group = graph["model.layers.0.mlp.experts:neurons"]
    assert group.kind == "channel" and group.units == 64 // BLOCK
    experts = model.model.layers[0].mlp.experts
    # one unit holds BLOCK neurons of the gate half, of the up half and of down_proj, in every expert
    assert group.unit_params[0] == experts.num_experts * BLOCK * (2 * experts.hidden_dim + experts.hidden_dim)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_silenced_expert_neurons_leave_the_logits_unchanged_when_removed(model_type):
    model = _build(model_type)
    experts = model.model.layers[0].mlp.experts
    result = hf_zoo.zero_unit_check_model(model, "channel")
    assert result["exact"], result
    assert experts.down_proj.shape[2] % BLOCK == 0 and experts.down_proj.shape[2] < 64
    assert experts.gate_up_proj.shape[1] == 2 * experts.down_proj.shape[2]
    assert model.model.layers[0].mlp.gate.weight.shape[0] == 4  # every expert stays
