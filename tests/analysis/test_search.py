"""SPDY-style search: the database follows the sequential runner, the result reproduces under
allocation='sensitivity', the model is left as it was, bad input is refused before anything runs."""

from __future__ import annotations

import pytest
import torch

from secateurs.analysis.search import build_database, default_grid, spdy_search
from secateurs.errors import ConfigError

transformers = pytest.importorskip("transformers")


def _llama():
    from secateurs.testing import tiny_llama

    return tiny_llama()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    segments = torch.randint(0, 96, (8, 16), generator=g)
    held = torch.randint(0, 96, (8, 16), generator=g)
    batches = [segments[:4], segments[4:]]
    evaluation = [{"input_ids": held[:4], "labels": held[:4]}, {"input_ids": held[4:], "labels": held[4:]}]
    return batches, evaluation


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_the_database_at_the_target_is_the_sequential_runners_uniform_prune(data, method):
    from secateurs.llm import prune_llm

    batches, _ = data
    model = _llama()
    before = _state(model)
    mode = {"wanda": "bake", "sparsegpt": "reconstruct"}[method]  # prune_llm's: SparseGPT updates the weights
    db = build_database(model, batches, method, [0.3, 0.5, 0.7], 0.5, {"mode": mode})
    assert _same(_state(model), before)  # building it leaves the model as it was
    prune_llm(model, method, 0.5, calibration=torch.cat(batches), batch_size=4, progress=False)
    for b, targets in enumerate(db.targets):
        for t in targets:
            assert torch.equal(db.weights[b][0.5][t.name], getattr(t.module, t.param_name)), t.name
    for errors in db.errors:  # the local error grows with the sparsity, from 0 at dense
        values = [errors[s] for s in (0.0, 0.3, 0.5, 0.7)]
        assert values[0] == 0.0 and values == sorted(values) and values[1] > 0


@pytest.mark.parametrize(("method", "granularity"), [("wanda", "blocks"), ("wanda", "layers"), ("sparsegpt", "blocks")])
def test_the_search_result_reproduces_under_allocation_sensitivity_and_leaves_the_model_alone(
    data, method, granularity
):
    from secateurs.llm import prune_llm

    batches, evaluation = data
    model = _llama()
    before = _state(model)
    result = spdy_search(
        model, batches, method=method, sparsity=0.5, evaluation=evaluation, grid=(0.3, 0.4, 0.5, 0.6, 0.7),
        evaluations=6, verify=2, granularity=granularity, progress=False,
    )  # fmt: skip
    assert len(result.sparsities) == (2 if granularity == "blocks" else 14)
    assert _same(_state(model), before)
    assert len(result.history) <= 6 and len({tuple(h["sparsities"]) for h in result.history}) == len(result.history)
    assert result.loss == result.profile.settings["loss"] and result.uniform_loss > 0
    assert result.profile.settings["options"]["mode"] == ("reconstruct" if method == "sparsegpt" else "bake")
    report = prune_llm(
        model, method, 0.5, calibration=torch.cat(batches), batch_size=4, progress=False,
        allocation="sensitivity", allocation_options={"profile": result.profile},
    )  # fmt: skip
    got = {layer.name.rpartition(".")[0]: layer.sparsity for layer in report.layers}
    for name, sparsity in result.sparsities.items():  # every layer of a block entry gets the block's sparsity
        assert all(abs(v - sparsity) < 0.02 for k, v in got.items() if k == name or k.startswith(name + ".")), name
    assert report.sparsity == pytest.approx(0.5, abs=2e-3)
    with torch.no_grad():  # the loss the search reported is the loss of this very prune
        losses = [float(model(**b).loss) for b in evaluation]
    assert sum(losses) / len(losses) == pytest.approx(result.loss, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.2}, "sparsity in (0, 1)"),
        ({"grid": ()}, "non-empty grid"),
        ({"grid": (0.5, 1.0)}, "outside (0, 1)"),
        ({"evaluations": 0}, "evaluations must be an integer >= 1"),
        ({"sigma": -1.0}, "sigma must be a positive number"),
        ({"mode": "mask"}, "mode must be one of bake, reconstruct"),
        ({"granularity": "heads"}, "granularity must be one of blocks, layers"),
    ],
)
def test_bad_search_settings_are_refused_before_the_model_is_touched(data, kwargs, message):
    batches, evaluation = data
    model = _llama()
    before = _state(model)
    settings = {"method": "wanda", "sparsity": 0.5, "evaluation": evaluation, "progress": False, **kwargs}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spdy_search(model, batches, **settings)
    assert _same(_state(model), before)


def test_layer_errors_grow_with_sparsity_and_the_layers_weights_are_the_block_prunes(data):
    batches, _ = data
    model = _llama()
    blocks = build_database(model, batches, "sparsegpt", [0.3, 0.6], 0.3, {"mode": "reconstruct"})
    layers = build_database(model, batches, "sparsegpt", [0.3, 0.6], 0.3, {"mode": "reconstruct"}, granularity="layers")
    assert len(layers.entries) == 14 and {e.kind for e in layers.entries} == {"layer"}
    for k, targets in enumerate(layers.targets):
        (t,) = targets
        b = next(i for i, ts in enumerate(blocks.targets) if any(u.name == t.name for u in ts))
        assert torch.equal(layers.weights[k][0.6][t.name], blocks.weights[b][0.6][t.name])
        assert 0.0 == layers.errors[k][0.0] < layers.errors[k][0.3] < layers.errors[k][0.6]


def test_the_default_grid_brackets_the_target_in_steps_of_five_points():
    assert default_grid(0.7) == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9]
    assert default_grid(0.1) == [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
