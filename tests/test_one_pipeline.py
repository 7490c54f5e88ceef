"""The seams of the one pipeline: config groups, OWL on any model, declared capabilities, configs stored as
given, the mask protocol for learned gates, training-time regularizers, and the method catalogue."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import secateurs
from secateurs import ConfigError, Gate, PruneConfig, StateError
from secateurs.testing import calibration, small_cnn, small_mlp


# -- per-glob overrides: a pattern or a method per layer ------------------------------------------------
def test_overrides_set_a_pattern_a_method_and_a_dense_layer_per_glob():
    model = small_cnn()
    report = secateurs.prune(
        model, "magnitude", 0.5, calibration=calibration(), progress=False,
        overrides={"3": {"pattern": "2:4"}, "5": {"method": "wanda", "sparsity": 0.75}, "9": 0},
    )  # fmt: skip
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["3.weight"].pattern_valid and by_name["3.weight"].sparsity == 0.5  # 2:4 on this conv only
    assert by_name["5.weight"].sparsity == 0.75  # Wanda, per output row, at its own sparsity
    rows = (model[5].weight == 0).flatten(1).sum(1)
    assert (rows == rows[0]).all()
    assert "9.weight" not in by_name and (model[9].weight != 0).all()  # left dense, out of the run
    assert report.config["overrides"]["9"] == {"sparsity": 0}


def test_override_refusals_name_the_glob_and_leave_the_model_alone():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        ({"nope.*": {"pattern": "2:4"}}, "overrides key 'nope.*' matches no target"),
        ({"3": {"patern": "2:4"}}, r"overrides\['3'\] has unknown key"),
        ({"3": {"sparsity": 1.5}}, r"overrides\['3'\].sparsity must be a number in \[0, 1\)"),
        ({"3": {"method": "bn_scale"}}, r"method 'bn_scale' supports mode 'remove'"),
        ({"3": "2:4"}, r"must be a sparsity or a mapping"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            secateurs.prune(model, "magnitude", 0.5, overrides=overrides, progress=False)
    with pytest.raises(ConfigError, match="mode='remove' does not take"):
        secateurs.prune(model, "magnitude", 0.5, mode="remove", overrides={"3": 0.2}, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- OWL is an allocation: any model with calibration data --------------------------------------------
def test_owl_on_the_whole_model_runner_prunes_the_layer_with_outliers_less():
    model = small_mlp()
    with torch.no_grad():
        model[3].weight[:2, :2] *= 40  # a few huge weights: outliers, as in LLMs
    report = secateurs.prune(
        model, "wanda", 0.5, allocation="owl", allocation_options={"m": 3, "lam": 0.1}, progress=False,
        scope={"skip_first": False}, calibration=calibration(shape=(16,)),
    )  # fmt: skip
    sparsities = report.details.layer_sparsities
    assert sparsities["3.weight"] < sparsities["0.weight"]  # no blocks: every tensor is a layer
    sizes = {"0.weight": model[0].weight.numel(), "3.weight": model[3].weight.numel()}
    # the layers differ in size: their sparsities average to the target weighted by size (the model loses 50%)
    assert sum(sparsities[k] * n for k, n in sizes.items()) / sum(sizes.values()) == pytest.approx(0.5)
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    assert report.outlier_ratios[1] > report.outlier_ratios[0]


def test_owl_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="N:M fixes the sparsity"):
        PruneConfig(method="wanda", pattern="2:4", allocation="owl")
    with pytest.raises(ConfigError, match=r"lambda=0.3 must be in \[0, 0.2\)"):
        PruneConfig(method="wanda", sparsity=0.8, allocation="owl", allocation_options={"lam": 0.3})
    with pytest.raises(ConfigError, match=r"bad allocation_options for 'owl'.*valid: 'lam', 'layers', 'm'"):
        PruneConfig(method="wanda", sparsity=0.5, allocation="owl", allocation_options={"lambda": 0.1})


# -- declared capabilities ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method="taylor", runner="blocks"), r"runner 'blocks' cannot gather 'batch_gradients', 'gradients'"),
        (dict(method="magnitude", runner="blocks", mode="remove"), r"runner 'blocks' does not apply mode 'remove'"),
        (dict(method="magnitude", runner="blocks", allocation="global"), "prunes one block at a time"),
        (dict(method="fpgm", mode="mask"), r"method 'fpgm' supports mode 'remove', not 'mask'; pass mode='remove'"),
        (dict(method="sparsegpt", allocation="global"), "chooses its mask while 'sparsegpt' updates the weights"),
        (dict(method="shortgpt", mode="remove", pattern="channel"), r"ranks 'layer', not channel"),
        (
            dict(method="magnitude", mode="reconstruct", solver="none"),
            "needs a solver; valid: 'alps', 'bias_compensation'",
        ),
        (dict(method="magnitude", runner="sideways"), r"runner must be one of 'blocks', 'model'"),
    ],
)
def test_a_method_is_refused_where_it_cannot_run_with_what_is_supported(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PruneConfig(sparsity=0.5, **kwargs)


# -- configs: stored as given, one strict parser ---------------------------------------------------------
def test_configs_store_what_was_given_and_resolve_beside_it():
    config = PruneConfig(method="wanda", pattern="2:4")
    assert config.sparsity is None and config.comparison is None and config.allocation is None and config.mode is None
    resolved = (config.sparsity_, config.comparison_, config.allocation_.name, config.mode_)
    assert resolved == (0.5, "row", "uniform", "mask")
    again = PruneConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict() and again.fingerprint() == config.fingerprint()
    assert config.given()["pattern"] == "2:4" and config.to_dict()["runner"] == "model"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(seed="1"), "seed must be an integer, got '1'"),
        (dict(seed=1.0), "seed must be an integer, got 1.0"),
        (dict(allocation=3), "allocation must be an allocation name"),
        (dict(method_options=[1]), r"method_options must be a mapping of strings to values, got \[1\] \(list\)"),
        (dict(scope={"include": 3}), "scope.include must be a string or a list of strings, got 3"),
        (dict(scope={"skip_first": "no"}), "scope.skip_first must be True or False"),
        (dict(sparsity=True), "sparsity must be a number in"),
        (dict(sparsity="0.5"), "sparsity must be a number in"),
        (dict(iterations=0), "iterations must be a positive integer"),
        (dict(structural={"round_to": 8}), "structural options apply only with mode='remove'"),
        (dict(mode="remove", structural={"bias_compensation": False}), "moved: use solver="),
    ],
)
def test_every_bad_value_gets_a_typed_message_naming_the_field(kwargs, message):
    kwargs = {"method": "magnitude", "sparsity": 0.5, **kwargs}
    with pytest.raises(ConfigError, match=message):
        PruneConfig(**kwargs)


def test_a_pattern_written_as_a_mapping_takes_integers_only():
    with pytest.raises(secateurs.PatternError, match=r"cannot read pattern .* \(integers\)"):
        PruneConfig(sparsity=0.5, pattern={"block": ["4", 4]})


def test_numpy_scalars_are_numbers():
    config = PruneConfig(sparsity=np.float32(0.5), seed=np.int64(3), iterations=np.int32(2))
    assert config.sparsity_ == 0.5 and isinstance(config.sparsity_, float)


def test_a_misspelled_keyword_is_a_typed_error_listing_the_valid_ones():
    with pytest.raises(
        ConfigError,
        match=r"prune\(\) got unknown keyword\(s\) 'sparsty' \(did you mean 'sparsity'\?\); valid: .*'sparsity'",
    ):
        secateurs.prune(small_cnn(), "magnitude", sparsty=0.5)


# -- the mask protocol: a learned gate beside binary masks ---------------------------------------------
class SigmoidGate(Gate):
    """A toy learned gate: weight * sigmoid(logits); an entry survives if its gate is above one half."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * torch.sigmoid(self.logits)

    def keep(self) -> torch.Tensor:
        return self.logits.detach() > 0

    def fold(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.where(self.keep(), weight * torch.sigmoid(self.logits.detach()), 0.0)


def test_a_learned_gate_speaks_the_mask_protocol(tmp_path):
    model = small_mlp()
    target = secateurs.scope.Target("3", model[3], secateurs.layout.Layout.LINEAR)
    logits = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    gate = secateurs.attach_gate(target, SigmoidGate(logits))
    x = torch.randn(4, 16)
    model(x).sum().backward()
    assert gate.logits.grad is not None  # the gate trains with the model
    with pytest.raises(StateError, match="already carries a SigmoidGate"):
        secateurs.attach_gate(target, SigmoidGate(logits))
    with pytest.raises(StateError, match="learned gate"):
        secateurs.prune(model, "magnitude", 0.5, scope=["3"], progress=False)
    with pytest.raises(secateurs.StructureError, match=r"carry learned gates.*secateurs\.bake\(model\)"):
        secateurs.prune(model, "magnitude", 0.5, mode="remove", example_inputs=x, progress=False)
    secateurs.save_masks(model, tmp_path / "m.safetensors")  # what the gate keeps, as a mask
    folded = torch.where(logits > 0, model[3].parametrizations.weight.original.detach() * torch.sigmoid(logits), 0.0)
    assert secateurs.bake(model) == 1  # the gate's decision folded into the weight, state_dict keys as before
    assert torch.equal(model[3].weight.detach(), folded)
    assert list(model.state_dict()) == list(small_mlp().state_dict())
    fresh = small_mlp()
    secateurs.load_masks(fresh, tmp_path / "m.safetensors")
    assert torch.equal(fresh[3].weight == 0, logits <= 0)


# -- training-time regularizers: Pruner.regularize() ---------------------------------------------------
def test_network_slimming_drives_batchnorm_scales_to_zero_then_removal_takes_them_out():
    torch.manual_seed(0)
    model = small_mlp().train()
    batches = calibration(shape=(16,), batches=8)
    pruner = secateurs.Pruner(model, "bn_scale", 0.5, mode="remove", example_inputs=batches[0][0],
                              regularizer="bn_l1", regularizer_options={"strength": 3e-2},
                              schedule={"kind": "oneshot", "at": 10**9})  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    start = float(model[1].weight.detach().abs().sum() + model[4].weight.detach().abs().sum())
    for _ in range(60):
        for x, y in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            penalty = pruner.regularize()
            optimizer.step()
            pruner.step()
    end = float(model[1].weight.detach().abs().sum() + model[4].weight.detach().abs().sum())
    assert penalty > 0 and end < 0.5 * start
    report = secateurs.prune(model.eval(), "bn_scale", 0.5, mode="remove", example_inputs=batches[0][0],
                             structural={"latency": False}, progress=False)  # fmt: skip
    assert report.params_ratio < 0.7


def test_bn_l1_penalises_the_new_batchnorm_scales_after_a_removal_step():
    model = small_mlp().train()
    x, y = calibration(shape=(16,), batches=1)[0]
    pruner = secateurs.Pruner(model, "bn_scale", 0.5, mode="remove", example_inputs=x, structural={"latency": False},
                              regularizer="bn_l1", regularizer_options={"strength": 0.1},
                              schedule={"kind": "oneshot", "at": 0})  # fmt: skip
    old = model[1].weight
    assert pruner.step().reshaped
    new = model[1].weight
    assert new is not old and new.shape[0] < old.shape[0]
    for p in [*model.parameters(), old]:
        p.grad = None
    nn.functional.cross_entropy(model(x), y).backward()
    loss_grad = new.grad.clone()
    pruner.regularize()
    penalty = 0.1 * new.detach().sign()  # the L1 subgradient, added on the new scales
    assert penalty.abs().sum() > 0 and torch.equal(new.grad, loss_grad + penalty)
    assert old.grad is None  # the replaced tensor is no longer penalised


def test_l1_only_touches_the_weights_in_scope_that_are_alive():
    model = small_mlp()
    pruner = secateurs.Pruner(model, "magnitude", 0.5, regularizer="l1", regularizer_options={"strength": 1.0},
                              scope=["3"], progress=False)  # fmt: skip
    pruner.prune_to(0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    pruner.regularize()
    alive = model[3].parametrizations.weight[0].mask
    grad = model[3].parametrizations.weight.original.grad
    assert torch.equal(grad[~alive], torch.zeros_like(grad[~alive]))
    assert torch.equal(grad[alive], model[3].parametrizations.weight.original.detach().sign()[alive])
    assert model[0].weight.grad.abs().sum() == 0  # out of scope
    with pytest.raises(StateError, match="no regularizer"):
        secateurs.Pruner(small_mlp(), "magnitude", 0.5).regularize()
    with pytest.raises(ConfigError, match="no affine BatchNorm"):
        secateurs.Pruner(small_cnn()[3:5], "magnitude", 0.5, regularizer="bn_l1",
                         scope={"skip_first": False, "skip_last": False})  # fmt: skip


# -- the catalogue -----------------------------------------------------------------------------------------
def test_methods_lists_every_role_with_needs_modes_and_runners(capsys):
    found = {(m.role, m.name): m for m in secateurs.methods()}
    assert found[("criterion", "wanda")].runners == ("model", "blocks")
    assert found[("criterion", "taylor")].runners == ("model",)
    assert found[("criterion", "sparsegpt")].defaults["mode"] == "reconstruct"
    assert found[("criterion", "flap")].modes == ("remove",) and found[("criterion", "flap")].defaults["solver"]
    assert found[("allocation", "owl")].needs == ("activations",)
    assert found[("solver", "bias_compensation")].modes == ("reconstruct", "remove")
    assert {role for role, _ in found} >= {"criterion", "solver", "allocation", "pattern", "mode", "runner",
                                           "schedule", "regularizer", "handler"}  # fmt: skip
    from secateurs.cli import main

    assert main(["methods", "--role", "solver"]) == 0
    out = capsys.readouterr().out
    assert "sparsegpt" in out and "bias_compensation" in out and "wanda" not in out
    with pytest.raises(ConfigError, match="unknown role"):
        secateurs.methods("criteria")


# -- an independent review's findings: each a silent wrong result before ---------------------------------
def _sparsities(model: nn.Module) -> dict[str, float]:
    return {n: round(float((m.weight == 0).float().mean()), 3) for n, m in model.named_modules()
            if isinstance(m, nn.Linear)}  # fmt: skip


def test_an_overrides_own_sparsity_wins_over_an_explicit_allocation():
    model = small_mlp()
    secateurs.prune(model, "magnitude", allocation={"*": 0.5}, overrides={"3": 0.8}, mode="bake", progress=False)
    assert _sparsities(model) == {"0": 0.5, "3": 0.8, "6": 0.0}  # 3 kept the allocation's 0.5 before


def test_an_explicit_allocation_may_name_a_layer_an_override_configures():
    model = small_mlp()  # "allocation key '3' matches no target" before: the key was checked per config group
    secateurs.prune(model, "magnitude", allocation={"0": 0.5, "3": 0.3}, overrides={"3": {"method": "random"}},
                    mode="bake", progress=False)  # fmt: skip
    assert _sparsities(model) == {"0": 0.5, "3": 0.3, "6": 0.0}
    with pytest.raises(ConfigError, match="allocation key 'nope' matches no target"):
        secateurs.prune(small_mlp(), "magnitude", allocation={"nope": 0.5}, overrides={"3": 0.2}, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method_options={"dampening": 10.0}), r"method_options=\{'dampening': 10.0\}.*solver_options"),
        (dict(comparison="row"), "chooses its mask block of columns by block of columns"),
        (dict(overrides={"3": {"comparison": "row"}}), r"overrides\['3'\].*chooses every mask itself"),
    ],
)
def test_options_the_adaptive_sparsegpt_path_would_ignore_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PruneConfig(method="sparsegpt", sparsity=0.5, **kwargs)
    PruneConfig(method="sparsegpt", sparsity=0.5, mode="mask", **kwargs)  # where the criterion runs, they apply


def test_the_adaptive_sparsegpt_recipe_round_trips_without_the_options_it_ignores():
    config = PruneConfig(method=secateurs.make_criterion("sparsegpt"), sparsity=0.5)
    recorded = config.to_dict()
    assert recorded["comparison"] is None and recorded["method_options"] is None
    assert PruneConfig.from_dict(recorded).to_dict() == recorded


def test_a_method_with_one_mode_runs_in_it_by_default():
    assert PruneConfig(method="fpgm", sparsity=0.5).mode_ == "remove"
    assert PruneConfig(method="magnitude", sparsity=0.5).mode_ == "mask"


@pytest.mark.parametrize("front_door", ["prune", "prune_llm"])
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(schedule={"kind": "cubic", "start": 0, "end": 10}), "training schedule cannot apply"),
     (dict(regularizer="l1"), "regularizer 'l1' is a training-time penalty")],
)  # fmt: skip
def test_training_options_are_refused_by_every_one_shot_front_door(front_door, kwargs, message):
    pytest.importorskip("transformers")
    from secateurs.llm import prune_llm
    from secateurs.testing import tiny_llama

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    call = secateurs.prune if front_door == "prune" else prune_llm
    with pytest.raises(ConfigError, match=message):
        call(model, "magnitude", 0.5, progress=False, **kwargs)  # prune_llm ran one-shot and ignored them before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_override_errors_name_the_override_and_owls_bound_is_checked_up_front():
    with pytest.raises(ConfigError, match=r"overrides\['3'\]: pattern 2:4 implies sparsity 0.5"):
        PruneConfig(method="magnitude", sparsity=0.5, overrides={"3": {"pattern": "2:4", "sparsity": 0.7}})
    with pytest.raises(secateurs.PatternError, match=r"overrides\['3'\]: unknown pattern 'bogus'"):
        PruneConfig(method="magnitude", sparsity=0.5, overrides={"3": {"pattern": "bogus"}})
    with pytest.raises(ConfigError, match=r"overrides\['3'\]: OWL lambda=0.1 must be in \[0, 0.05\)"):
        PruneConfig(method="wanda", sparsity=0.5, allocation="owl", allocation_options={"lam": 0.1},
                    overrides={"3": 0.05})  # fmt: skip


# -- the block runner prunes what the whole-model runner prunes -------------------------------------------
def _llama_segments():
    return [s[None] for s in torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))]


def test_the_block_runner_refuses_an_include_that_names_layers_outside_the_blocks():
    pytest.importorskip("transformers")
    from secateurs.testing import tiny_llama

    model = tiny_llama()
    with pytest.raises(secateurs.ScopeError, match=r"includes lm_head\.weight, outside the blocks .model\.layers."):
        secateurs.prune(model, "wanda", 0.5, runner="blocks", calibration=_llama_segments(), progress=False,
                        scope={"include": ["lm_head", "model.layers"], "skip_last": False})  # fmt: skip
    report = secateurs.prune(model, "wanda", 0.5, runner="blocks", calibration=_llama_segments(), progress=False,
                             scope={"skip_last": False})  # fmt: skip
    assert report.details.outside_blocks == ["lm_head.weight"]  # the default include: left dense, and said so
    assert "left dense, outside the blocks: lm_head.weight" in report.table()


@pytest.mark.parametrize("runner", ["model", "blocks"])
def test_an_override_at_zero_leaves_its_layers_alone_under_both_runners(runner):
    pytest.importorskip("transformers")
    from secateurs.masking import masked_targets
    from secateurs.testing import tiny_llama

    model = tiny_llama()
    secateurs.prune(model, "wanda", 0.3, runner="blocks", mode="mask", calibration=_llama_segments(), progress=False)
    secateurs.prune(model, "wanda", 0.5, runner=runner, mode="bake", overrides={"*.mlp.*": 0},
                    calibration=_llama_segments(), progress=False)  # fmt: skip
    left = [t.name for t in masked_targets(model)]
    assert len(left) == 6 and all(".mlp." in n for n in left)  # the blocks runner baked them too before


def test_the_block_runner_refuses_a_lower_sparsity_over_existing_masks():
    pytest.importorskip("transformers")
    from secateurs.testing import tiny_llama

    model = tiny_llama()
    secateurs.prune(model, "wanda", 0.6, runner="blocks", mode="mask", calibration=_llama_segments(), progress=False)
    with pytest.raises(ConfigError, match=r"already 59\.38% sparse"):
        secateurs.prune(model, "wanda", 0.3, runner="blocks", mode="mask", calibration=_llama_segments(),
                        progress=False)  # fmt: skip


def test_an_explicit_allocation_checks_each_named_layer_against_its_masks():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    secateurs.prune(model, "magnitude", 0.5, scope={"skip_first": False}, progress=False)
    with pytest.raises(ConfigError, match=r"'2.weight' is already 50\.00% sparse"):
        secateurs.prune(model, "magnitude", None, allocation={"0": 0.7, "2": 0.3}, progress=False)
    report = secateurs.prune(model, "magnitude", None, allocation={"0": 0.7}, scope={"skip_first": False},
                             progress=False)  # a layer no key names keeps its masks  # fmt: skip
    assert {r.name: round(r.sparsity, 2) for r in report.layers} == {"0.weight": 0.7, "2.weight": 0.5}
    # a schedule's steps ask each named layer for its share of the value, so they grow without a refusal
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    pruner = secateurs.Pruner(model, "magnitude", None, allocation={"0": 0.6, "2": 0.3}, scope={"skip_first": False},
                              schedule={"kind": "linear", "start": 0, "end": 4, "every": 1})  # fmt: skip
    for _ in range(5):
        pruner.step()
    assert [round(float((model[i].weight == 0).float().mean()), 1) for i in (0, 2)] == [0.6, 0.3]
    secateurs.prune(model, "magnitude", None, allocation={"0": 0.8, "2": 0.0}, scope={"skip_first": False},
                    progress=False)  # 0 leaves a masked layer as it is, as an override at 0 does  # fmt: skip
    assert round(float((model[2].weight == 0).float().mean()), 1) == 0.3


@pytest.mark.parametrize("pattern", ["unstructured", "output_channel"])
def test_a_gradual_schedule_is_never_refused_when_a_rounded_step_already_reached_the_next(pattern):
    """Rounding up at one step can leave the next, smaller step already reached: a no-op, not an error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    pruner = secateurs.Pruner(model, "magnitude", 0.5, pattern=pattern, example_inputs=torch.randn(4, 256),
                              schedule={"kind": "cubic", "start": 0, "end": 100})  # fmt: skip
    for _ in range(101):
        pruner.step()
    assert pruner.current_sparsity == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="masks only grow"):
        pruner.prune_to(0.3)  # a request below the last one is still refused


def test_a_pruner_with_a_loss_fn_pickles():
    import pickle

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batch = (torch.randn(4, 8), torch.randint(0, 4, (4,)))
    pruner = secateurs.Pruner(model, "taylor", 0.5, calibration=[batch], loss_fn=_cross_entropy_loss,
                              schedule={"kind": "linear", "start": 0, "end": 2})  # fmt: skip
    restored = pickle.loads(pickle.dumps(pruner))
    assert restored.data.loss_fn(restored.model, batch).numel() == 1


def _cross_entropy_loss(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_scope_takes_any_iterable_of_globs():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    report = secateurs.prune(model, "magnitude", 0.5, scope={"2"}, progress=False)
    assert [r.name for r in report.layers] == ["2.weight"]
    from types import MappingProxyType  # any mapping is fields, never a list of include globs

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    report = secateurs.prune(model, "magnitude", 0.5, scope=MappingProxyType({"skip_first": False}), progress=False)
    assert [r.name for r in report.layers] == ["0.weight", "2.weight"]


def test_an_override_method_with_other_defaults_needs_the_runs_allocation_and_rounds_chosen():
    """Under the run's allocation LAMP would rank like magnitude and SynFlow would run one round: refused
    unless the run names them (then they are the user's choice)."""
    x = torch.randn(4, 8)

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    with pytest.raises(ConfigError, match="'lamp' ranks with allocation 'global' by default"):
        secateurs.prune(mlp(), "magnitude", 0.5, overrides={"*": {"method": "lamp"}}, progress=False)
    with pytest.raises(ConfigError, match="'synflow' prunes in 100 rounds by default, but an override runs in"):
        secateurs.prune(mlp(), "magnitude", 0.5, allocation="global", overrides={"2": {"method": "synflow"}},
                        example_inputs=x, progress=False)  # fmt: skip
    secateurs.prune(mlp(), "magnitude", 0.5, allocation="uniform", overrides={"*": {"method": "lamp"}}, progress=False)
    secateurs.prune(mlp(), "magnitude", 0.5, allocation="global", iterations=4, overrides={"2": {"method": "synflow"}},
                    example_inputs=x, progress=False)  # fmt: skip


def test_the_llm_front_doors_scope_defaults_fill_only_what_the_user_left_out():
    from secateurs.llm import LLMPruneConfig

    scope = LLMPruneConfig(sparsity=0.5, scope={"types": ["Conv2d"], "embeddings": True, "skip_last": True}).scope_
    assert (scope.types, scope.embeddings, scope.skip_last, scope.skip_first) == (("Conv2d",), True, True, False)
    assert LLMPruneConfig(sparsity=0.5, scope=["*.mlp.*"]).scope_.types == ("Linear", "Conv1D")


def test_l1_in_remove_mode_regularizes_the_scopes_weights_and_follows_every_reshape():
    model = small_mlp()  # "the scope selects none" before: removal has no mask targets to bind to
    pruner = secateurs.Pruner(model, "magnitude", 0.5, mode="remove", regularizer="l1",
                              example_inputs=torch.randn(2, 16), structural={"latency": False},
                              schedule={"kind": "linear", "start": 0, "end": 2, "every": 1})  # fmt: skip
    widths = []
    for _ in range(3):
        model(torch.randn(4, 16)).sum().backward()
        pruner.regularize()  # adds strength * sign(w) to the gradients of the weights in scope, as they are now
        widths.append(model[3].weight.shape[0])
        assert model[3].weight.grad is not None and model[3].weight.grad.abs().sum() > 0
        model.zero_grad()
        pruner.step()
    assert widths[0] > widths[-1]  # it reshaped, and the penalty followed the new tensors


def test_each_config_group_gathers_only_the_evidence_its_method_reads():
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc, self.out = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.fc(self.emb(x)).mean(1))

    torch.manual_seed(0)
    model = Bag()
    batches = [(torch.randint(0, 20, (4, 5)), torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    # a Hessian used to be gathered for the embedding too (magnitude reads none), and crashed the run
    report = secateurs.prune(model, "magnitude", 0.5, overrides={"fc": {"method": "sparsegpt"}}, calibration=batches,
                             scope={"include": ["emb", "fc"], "embeddings": True, "skip_first": False},
                             progress=False)  # fmt: skip
    assert {layer.name: layer.sparsity for layer in report.layers} == {"emb.weight": 0.5, "fc.weight": 0.5}


def test_the_block_runner_gathers_per_config_group_too():
    pytest.importorskip("transformers")
    from secateurs.masking import masked_targets
    from secateurs.testing import tiny_llama

    mixed, plain = tiny_llama(), tiny_llama()
    secateurs.prune(mixed, "magnitude", 0.5, runner="blocks", overrides={"*.mlp.*": {"method": "sparsegpt"}},
                    calibration=_llama_segments(), progress=False)  # fmt: skip
    secateurs.prune(plain, "magnitude", 0.5, runner="blocks", calibration=_llama_segments(), progress=False)
    masks = {t.name: t.module.parametrizations.weight[0].mask for t in masked_targets(mixed)}
    for t in masked_targets(plain):
        same = torch.equal(masks[t.name], t.module.parametrizations.weight[0].mask)
        assert same == (".mlp." not in t.name), t.name  # attention: magnitude's masks; MLP: SparseGPT's
