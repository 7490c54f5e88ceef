"""Finding the repeated blocks and capturing their inputs, for every architecture family."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.blocks import batched, capture_inputs
from secateurs.llm import BlockDiscoveryError, find_blocks
from secateurs.runners.blocks import propagate

from .conftest import tiny

EXPECTED = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "bert": "bert.encoder.layer",
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_blocks_are_found_without_hard_coded_paths(arch):
    name, blocks = find_blocks(tiny(arch))
    assert name == EXPECTED[arch]
    assert len(blocks) == 2


def test_blocks_can_be_named_explicitly(llama):
    name, blocks = find_blocks(llama, "model.layers")
    assert name == "model.layers" and blocks[0] is llama.model.layers[0]


def test_a_model_without_repeated_blocks_is_refused_with_how_to_name_them():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(BlockDiscoveryError, match=r"blocks='<qualified.name>'.*--blocks"):
        find_blocks(model)


def test_a_wrong_block_name_lists_the_containers(llama):
    with pytest.raises(BlockDiscoveryError, match=r"names no submodule.*model\.layers"):
        find_blocks(llama, "model.blocks")


def test_a_block_name_that_is_not_a_list_is_refused(llama):
    with pytest.raises(BlockDiscoveryError, match="not a non-empty ModuleList"):
        find_blocks(llama, "model.norm")


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_replaying_captured_calls_reproduces_the_models_hidden_states(arch, segments):
    """Capture + replay of each block (args and kwargs: masks, rotary embeddings ...) must give
    exactly what the model computes internally, block after block."""
    model = tiny(arch)
    _, blocks = find_blocks(model)
    batches = list(batched(segments, 4))
    inputs = capture_inputs(model, blocks, batches)
    with torch.no_grad():
        expected = [model(b, output_hidden_states=True).hidden_states for b in batches]
    for b in range(len(batches)):
        torch.testing.assert_close(inputs.hidden[b], expected[b][0])
    propagate(blocks[0], 0, inputs)
    for b in range(len(batches)):
        torch.testing.assert_close(inputs.hidden[b], expected[b][1], rtol=1e-5, atol=1e-5)


def test_identical_calls_are_stored_once(llama, segments):
    _, blocks = find_blocks(llama)
    inputs = capture_inputs(llama, blocks, list(batched(segments, 2)))
    assert len({id(c) for c in inputs.calls}) == 1
    assert inputs.own_calls == {}


def test_caches_are_not_captured(llama, segments):
    _, blocks = find_blocks(llama)
    inputs = capture_inputs(llama, blocks, [segments[:2]])
    assert "Cache" not in repr(inputs.calls[0].kwargs)


def test_blocks_called_differently_get_their_own_calls(segments):
    """Qwen2 with sliding-window attention on some layers: those blocks get other masks."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True, sliding_window=8,
        max_window_layers=1,
    )  # fmt: skip
    model = transformers.Qwen2ForCausalLM(config).eval()
    _, blocks = find_blocks(model)
    batches = list(batched(segments, 3))  # shapes (3, 32), (3, 32), (2, 32)
    inputs = capture_inputs(model, blocks, batches)
    assert inputs.own_calls  # at least one block is called unlike block 0
    with torch.no_grad():
        expected = [model(b, output_hidden_states=True).hidden_states for b in batches]
    for i in range(len(blocks) - 1):
        propagate(blocks[i], i, inputs)
        for b in range(len(batches)):
            torch.testing.assert_close(inputs.hidden[b], expected[b][i + 1], rtol=1e-5, atol=1e-5)
