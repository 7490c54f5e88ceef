"""Sparsity learned during training: each penalty and its gradient against a hand-computed value,
deterministic gates at inference, conversion to masks / baked zeros / removal keeping the outputs,
and the refusals (nothing to act on, a penalty that diverges, removal with gates attached)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateurs
from secateurs import ConfigError, StateError
from secateurs.errors import NonFiniteError, StructureError
from secateurs.training import gates_to_masks, remove_zero_groups
from secateurs.training.gates import K1, K2, K3, HardConcreteGate, VariationalDropoutGate
from secateurs.training.regularizers import ramp


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def task(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable 3-class problem on 4 features (labels from a fixed linear map)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (x @ torch.tensor([[1.0, -1, 0], [0, 1, -1], [1, 0, 1], [-1, 1, 0]])).argmax(1)


def train(model, pruner, x, y, steps, lr=1e-2, sgd=False):
    optimizer = (torch.optim.SGD if sgd else torch.optim.Adam)(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pruner.regularize()
        optimizer.step()
        pruner.step()
    model.eval()


# -- group lasso --------------------------------------------------------------------------------------
def test_group_lasso_penalty_and_gradient_are_the_l2_norms_of_each_coupled_unit():
    model, x = mlp(), torch.randn(8, 4)
    pruner = secateurs.Pruner(model, regularizer="group_lasso", example_inputs=x, regularizer_options={"strength": 0.3})
    value = pruner.regularize()
    w1, b1, w2 = model[0].weight, model[0].bias, model[2].weight
    w3 = model[4].weight
    # a hidden neuron of layer 0 is its row, its bias and the next layer's column; likewise for layer 2
    n1 = (w1.square().sum(1) + b1.square() + w2.square().sum(0)).sqrt()
    b2 = model[2].bias
    n2 = (w2.square().sum(1) + b2.square() + w3.square().sum(0)).sqrt()
    assert value == pytest.approx(0.3 * float(n1.sum() + n2.sum()), rel=1e-6)
    torch.testing.assert_close(w1.grad, 0.3 * w1.detach() / n1[:, None].detach())
    torch.testing.assert_close(b1.grad, 0.3 * b1.detach() / n1.detach())
    # layer 2's weight is in two groups: its rows (neurons of layer 2) and its columns (neurons of layer 0)
    torch.testing.assert_close(
        w2.grad, 0.3 * w2.detach() / n2[:, None].detach() + 0.3 * w2.detach() / n1[None].detach()
    )


def test_group_lasso_proximal_step_gives_exact_zero_groups_and_their_removal_keeps_the_outputs():
    model = mlp()
    x, y = task()
    pruner = secateurs.Pruner(model, regularizer="group_lasso", example_inputs=x,
                              regularizer_options={"strength": 0.05, "proximal_lr": 0.2})  # fmt: skip
    train(model, pruner, x, y, 100, lr=0.2, sgd=True)  # proximal gradient descent: SGD, the same step size
    report = pruner.regularization_report()
    assert 0 < report.zero < report.groups  # some units exactly zero, not all
    before = model(x)
    removed = remove_zero_groups(model, x)
    assert removed.total == report.zero
    assert model[0].out_features + model[2].out_features == 11 - removed.total
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-5)


def test_group_lasso_covers_attention_heads_with_gqa():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 8))
    pruner = secateurs.Pruner(model, regularizer="group_lasso", example_inputs=ids,
                              regularizer_options={"strength": 1.0, "kinds": ["head"], "proximal_lr": 1e9})  # fmt: skip
    pruner.step()  # a huge proximal step: every head group to zero
    heads = [g for g, _ in pruner.config.regularizer_._groups]
    assert [(g.kind, g.units, g.rows) for g in heads] == [("head", 4, 2)]  # 4 query heads in 2 KV groups
    attn = model.model.layers[0].self_attn
    # a query head's unit: its q_proj rows and o_proj columns; the shared K/V heads are not one head's
    assert float(attn.q_proj.weight.abs().sum()) == 0 and float(attn.o_proj.weight.abs().sum()) == 0
    assert float(attn.k_proj.weight.abs().sum()) > 0 and float(model.model.layers[0].mlp.up_proj.weight.abs().sum()) > 0


# -- network slimming --------------------------------------------------------------------------------
def test_slimming_proximal_step_zeroes_batchnorm_scales_exactly_then_bn_scale_removal_takes_them_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3))  # fmt: skip
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 3, (16,))
    pruner = secateurs.Pruner(model, regularizer="bn_l1", regularizer_options={"strength": 0.5, "proximal_lr": 0.1})
    train(model, pruner, x, y, 20, lr=0.1, sgd=True)
    zero = int((model[1].weight == 0).sum() + (model[4].weight == 0).sum())
    assert 0 < zero == pruner.regularization_report().zero < 16
    report = secateurs.prune(model, "bn_scale", zero / 16, mode="remove", example_inputs=x, progress=False,
                             structural={"latency": False})  # fmt: skip
    assert model[1].num_features + model[4].num_features == 16 - zero
    assert report.after.params < report.before.params


def test_slimming_on_a_model_without_norms_is_refused_and_layernorm_is_opt_in():
    with pytest.raises(ConfigError, match=r"no affine BatchNorm.*layernorm"):
        secateurs.Pruner(mlp(), regularizer="bn_l1")
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    pruner = secateurs.Pruner(model, regularizer="bn_l1", regularizer_options={"layernorm": True, "strength": 0.5})
    model(torch.randn(2, 4)).sum().backward()
    grad = model[1].weight.grad.clone()
    pruner.regularize()
    torch.testing.assert_close(model[1].weight.grad, grad + 0.5 * model[1].weight.detach().sign())


# -- sparse variational dropout -------------------------------------------------------------------------
def test_sparse_vd_kl_and_its_gradient_match_the_papers_approximation():
    model = nn.Sequential(nn.Linear(3, 2))
    pruner = secateurs.Pruner(model, regularizer="sparse_vd", regularizer_options={"strength": 0.1},
                              scope={"skip_last": False})  # fmt: skip
    gate = model[0].parametrizations.weight[0]
    theta = model[0].parametrizations.weight.original
    with torch.no_grad():
        gate.log_sigma2.copy_(torch.tensor([[-4.0, -1.0, 0.5], [-6.0, -2.0, 1.0]]))
    la = (gate.log_sigma2 - torch.log(theta.square() + 1e-8)).clamp(-10, 10).detach()
    sig = torch.sigmoid(K2 + K3 * la)
    kl = K1 - K1 * sig + 0.5 * torch.log1p(torch.exp(-la))
    value = pruner.regularize()
    assert value == pytest.approx(0.1 * float(kl.sum()), rel=1e-5)
    dkl_dla = -K1 * K3 * sig * (1 - sig) - 0.5 * torch.sigmoid(-la)  # d log_alpha / d log_sigma2 = 1
    torch.testing.assert_close(gate.log_sigma2.grad, 0.1 * dkl_dla)
    # d log_alpha / d theta = -2 theta / (theta^2 + 1e-8)
    torch.testing.assert_close(theta.grad, 0.1 * dkl_dla * (-2 * theta.detach() / (theta.detach().square() + 1e-8)))


def test_sparse_vd_local_reparameterisation_noise_has_the_variance_x2_sigma2_and_inference_is_deterministic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    layer = model[0]
    secateurs.Pruner(model, regularizer="sparse_vd", scope={"skip_last": False})
    gate = layer.parametrizations.weight[0]
    theta = layer.parametrizations.weight.original.detach()
    with torch.no_grad():
        gate.log_sigma2.copy_(torch.log(0.5 * theta.square()))  # alpha = 0.5 everywhere
    x = torch.tensor([[1.0, 2.0, -1.0]]).repeat(20000, 1)
    layer.train()
    with torch.no_grad():
        out = layer(x)
    expected_var = x[:1].square() @ (0.5 * theta.square()).T
    torch.testing.assert_close(out.var(0), expected_var[0], rtol=0.05, atol=1e-4)
    torch.testing.assert_close(out.mean(0), F.linear(x[:1], theta, layer.bias)[0], rtol=0.05, atol=0.02)
    layer.eval()
    assert torch.equal(layer(x[:5]), layer(x[:5]))


def test_sparse_vd_prunes_weights_above_the_threshold_and_conversion_keeps_the_outputs():
    model = mlp()
    x, y = task(256)
    pruner = secateurs.Pruner(model, regularizer="sparse_vd", regularizer_options={"strength": 1 / 256},
                              scope={"skip_last": False, "skip_first": False})  # fmt: skip
    train(model, pruner, x, y, 300, lr=3e-2)
    gate = model[2].parametrizations.weight[0]
    assert isinstance(gate, VariationalDropoutGate)
    theta = model[2].parametrizations.weight.original.detach()
    assert torch.equal(gate.keep(), gate.log_alpha(theta) < 3.0)
    assert pruner.regularization_report().zero > 0
    before = model(x)
    with pytest.raises(StructureError, match=r"learned gates.*VariationalDropoutGate.*secateurs\.bake\(model\)"):
        remove_zero_groups(model, x)
    assert gates_to_masks(model) == 3
    torch.testing.assert_close(model(x), before)
    secateurs.bake(model)
    torch.testing.assert_close(model(x), before)
    assert not any(n.endswith("log_sigma2") for n, _ in model.named_parameters())  # the gates are gone


# -- L0 gates -------------------------------------------------------------------------------------
def test_l0_expected_penalty_and_its_gradient_match_eq_12():
    model = nn.Sequential(nn.Linear(4, 2))
    pruner = secateurs.Pruner(model, regularizer="l0", scope={"skip_last": False},
                              regularizer_options={"strength": 0.2, "granularity": "neuron"})  # fmt: skip
    gate = model[0].parametrizations.weight[0]
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    p = torch.sigmoid(gate.log_alpha.detach() - (2 / 3) * math.log(0.1 / 1.1))
    value = pruner.regularize()
    assert value == pytest.approx(0.2 * 2 * float(p.sum()), rel=1e-6)  # each input gate controls 2 weights
    torch.testing.assert_close(gate.log_alpha.grad, 0.2 * 2 * p * (1 - p))


def test_hard_concrete_gates_use_the_papers_stretch_and_are_deterministic_at_inference():
    gate = HardConcreteGate((3, 4), dim=1)
    assert (gate.gamma, gate.zeta, gate.beta) == (-0.1, 1.1, 2 / 3)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-5.0, 0.0, 1.0, 5.0]))
    z = gate.deterministic()
    torch.testing.assert_close(z, (torch.sigmoid(gate.log_alpha) * 1.2 - 0.1).clamp(0, 1).detach())
    assert z[0] == 0 and z[3] == 1
    gate.eval()
    w = torch.ones(3, 4)
    assert torch.equal(gate(w), gate(w))
    gate.train()
    samples = torch.stack([gate(w)[0] for _ in range(200)])
    assert samples[:, 1].std() > 0.1  # stochastic while training
    assert set(samples.unique().tolist()) >= {0.0, 1.0}  # the stretch puts mass on exact 0 and 1


def test_l0_neuron_gates_bake_into_a_model_whose_dead_neurons_removal_takes_out_unchanged():
    model = mlp()
    x, y = task(256)
    pruner = secateurs.Pruner(model, regularizer="l0", scope={"skip_first": False, "skip_last": False},
                              regularizer_options={"strength": 0.02, "granularity": "neuron"})  # fmt: skip
    train(model, pruner, x, y, 300, lr=3e-2)
    before = model(x)
    assert torch.equal(model(x), before)  # deterministic at inference
    secateurs.bake(model)
    torch.testing.assert_close(model(x), before)
    removed = remove_zero_groups(model, x)
    assert removed.total > 0
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-5)


def test_gates_to_masks_keeps_the_scaling_of_l0_gates():
    model = mlp()
    secateurs.Pruner(model, regularizer="l0", regularizer_options={"droprate_init": 0.3})
    model.eval()
    x = torch.randn(5, 4)
    before = model(x)
    assert gates_to_masks(model) == 2  # the default scope: every Linear but the classifier
    torch.testing.assert_close(model(x), before)


# -- movement pruning ---------------------------------------------------------------------------------
def test_hard_movement_scores_accumulate_minus_w_times_grad_and_prune_the_lowest():
    model = mlp()
    x, y = task()
    pruner = secateurs.Pruner(model, "movement", 0.5, regularizer="movement", scope=["2"],
                              schedule={"kind": "oneshot", "at": 1})  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = torch.zeros_like(model[2].weight)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        expected -= model[2].weight.detach() * model[2].weight.grad
        pruner.regularize()
        optimizer.step()
        pruner.step()
    mask = model[2].parametrizations.weight[0].mask
    kept = expected.flatten().topk(15).indices
    assert int(mask.sum()) == 15 and bool(mask.flatten()[kept].all())


def test_hard_movement_scores_with_adam_steps_match_adam_by_hand():
    # the authors' released code trains the scores with Adam: S takes -m_hat / (sqrt(v_hat) + eps) on dL/dS = W * dL/dW
    model = mlp()
    x, y = task()
    options = {"score_update": "adam"}
    pruner = secateurs.Pruner(model, "movement", 0.5, regularizer="movement", scope=["2"],
                              regularizer_options=options, schedule={"kind": "oneshot", "at": 2})  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    m = torch.zeros_like(model[2].weight)
    v, expected = torch.zeros_like(m), torch.zeros_like(m)
    for t in (1, 2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        g = model[2].weight.detach() * model[2].weight.grad
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        expected -= (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
        pruner.regularize()
        optimizer.step()
    scores = secateurs.criteria.movement.movement_scores(model[2].weight)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    plain = secateurs.Pruner(mlp(), "movement", 0.5, regularizer="movement", scope=["2"])
    assert "score_update" not in plain.config.regularizer_.options()
    with pytest.raises(secateurs.errors.ConfigError, match="score_update"):
        secateurs.Pruner(mlp(), "movement", 0.5, regularizer="movement", scope=["2"],
                         regularizer_options={"score_update": "rms"})  # fmt: skip


def test_hard_movement_scores_of_masked_weights_use_the_masked_weights_gradient():
    # Sanh et al. 2020: the straight-through estimator hands every score dL/dW' (W' = W * M), so a pruned
    # weight's score keeps moving; dL/dW itself is zero there under the mask
    model = mlp()
    x, y = task()
    pruner = secateurs.Pruner(model, "movement", 0.5, regularizer="movement", scope=["2"],
                              schedule={"kind": "oneshot", "at": 0})  # fmt: skip
    F.cross_entropy(model(x), y).backward()
    pruner.regularize()
    pruner.step()  # masked now
    model.zero_grad()
    weight = model[2].parametrizations.weight.original
    before = secateurs.criteria.movement.movement_scores(weight).clone()
    weight = weight.detach()
    masked = torch.where(model[2].parametrizations.weight[0].mask, weight, 0.0).requires_grad_()
    hidden = model[1](model[0](x))
    F.cross_entropy(model[4](model[3](F.linear(hidden, masked, model[2].bias))), y).backward()
    expected = before - weight * masked.grad
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pruner.regularize()
    after = secateurs.criteria.movement.movement_scores(model[2].parametrizations.weight.original)
    torch.testing.assert_close(after, expected)
    pruned = ~model[2].parametrizations.weight[0].mask
    assert bool((after[pruned] != before[pruned]).any())


def test_hard_movement_brings_back_a_pruned_weight_whose_score_rose():
    model = mlp()
    x, y = task()
    pruner = secateurs.Pruner(model, "movement", 0.5, regularizer="movement", scope=["2"],
                              schedule={"kind": "cubic", "start": 0, "end": 2, "every": 1})  # fmt: skip
    for _ in range(2):  # steps 0 (sparsity 0) and 1 (0.4375 of the final 0.5 on the cubic ramp)
        F.cross_entropy(model(x), y).backward()
        pruner.regularize()
        pruner.step()
    mask = model[2].parametrizations.weight[0].mask.clone()
    assert int(mask.sum()) == 30 - 13
    value = model[2].parametrizations.weight.original.detach().clone()
    scores = secateurs.criteria.movement.movement_scores(model[2].parametrizations.weight.original)
    revived = int((~mask).flatten().nonzero()[0])
    scores.view(-1)[revived] = scores.max() + 1.0  # its movement now outranks every kept weight's
    pruner.step()  # step 2: the final 50%, chosen afresh
    new = model[2].parametrizations.weight[0].mask
    assert bool(new.view(-1)[revived]) and int(new.sum()) == 15
    torch.testing.assert_close(model[2].weight.detach().view(-1)[revived], value.view(-1)[revived])


def test_movement_without_accumulated_scores_says_which_regularizer_to_use():
    with pytest.raises(secateurs.errors.DataRequiredError, match="regularizer='movement'"):
        secateurs.Pruner(mlp(), "movement", 0.5).prune_to(0.5)
    with pytest.raises(ConfigError, match=r"one-shot prune has no training.*regularizer='movement'"):
        secateurs.prune(mlp(), "movement", 0.5, progress=False)


def test_soft_movement_scores_learn_through_the_straight_through_estimator():
    model = nn.Sequential(nn.Linear(4, 2))
    pruner = secateurs.Pruner(model, regularizer="soft_movement", scope={"skip_last": False},
                              regularizer_options={"strength": 0.3})  # fmt: skip
    gate = model[0].parametrizations.weight[0]
    x = torch.randn(3, 4)
    model(x).sum().backward()
    grad_effective = torch.ones(3, 2).T @ x  # d sum(xW^T + b) / dW'
    straight = gate.scores.grad.clone()
    torch.testing.assert_close(straight, grad_effective * model[0].parametrizations.weight.original.detach())
    pruner.regularize()
    s = torch.sigmoid(gate.scores.detach())
    torch.testing.assert_close(gate.scores.grad, straight + 0.3 * s * (1 - s))


# -- schedules, reports, refusals -------------------------------------------------------------------------
def test_strength_schedule_ramps_the_penalty_in():
    schedule = {"kind": "linear", "start": 2, "end": 6}
    assert [ramp(schedule, s) for s in (0, 2, 4, 6, 9)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert ramp({"kind": "cubic", "start": 0, "end": 4}, 2) == pytest.approx(1 - 0.5**3)
    model = mlp()
    pruner = secateurs.Pruner(
        model, regularizer="l1", regularizer_options={"strength": 1.0, "strength_schedule": schedule}
    )
    assert pruner.regularize() == 0.0
    with pytest.raises(ConfigError, match="strength_schedule"):
        secateurs.Pruner(model, regularizer="l1", regularizer_options={"strength_schedule": {"kind": "exp"}})


def test_a_penalty_that_diverges_stops_naming_the_tensor_and_step_and_writes_nothing():
    model = mlp()
    x, y = task()
    pruner = secateurs.Pruner(model, regularizer="group_lasso", example_inputs=x, regularizer_options={"strength": 0.1})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, pruner, x, y, 2)
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        NonFiniteError, match=r"'group_lasso' at step 2: the penalty's gradient is not finite on 2\.weight"
    ):
        pruner.regularize()
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads[n] is None)
        if p.grad is not None:
            assert torch.equal(p.grad.nan_to_num(), grads[n].nan_to_num())
    assert all(torch.equal(v.nan_to_num(), state[k].nan_to_num()) for k, v in model.state_dict().items())


def test_a_nan_gate_parameter_is_named_with_its_layer():
    model = mlp()
    pruner = secateurs.Pruner(model, regularizer="sparse_vd")
    with torch.no_grad():
        model[2].parametrizations.weight[0].log_sigma2[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"on 2\.weight"):
        pruner.regularize()
    assert all(p.grad is None for p in model.parameters())


def test_regularizers_refuse_what_they_cannot_act_on():
    with pytest.raises(secateurs.errors.DataRequiredError, match="example_inputs"):
        secateurs.Pruner(mlp(), regularizer="group_lasso")
    with pytest.raises(ConfigError, match=r"needs nn\.Linear or nn\.Conv"):
        secateurs.Pruner(nn.Sequential(nn.Linear(2, 2), nn.Embedding(4, 2)), regularizer="sparse_vd",
                         scope={"types": ["Embedding"], "embeddings": True})  # fmt: skip
    with pytest.raises(ConfigError, match="granularity"):
        secateurs.Pruner(mlp(), regularizer="l0", regularizer_options={"granularity": "row"})
    model = mlp()
    secateurs.prune(model, "magnitude", 0.5, progress=False)
    with pytest.raises(StateError, match="already carries a WeightMask"):
        secateurs.Pruner(model, regularizer="l0")
    assert secateurs.training.gates.gate_of(model[2], "weight").__class__.__name__ == "WeightMask"  # untouched


def test_the_library_training_loop_applies_the_pruners_regularizer_between_backward_and_step():
    """secateurs.training.train drove pruner.step() but never pruner.regularize(): a regularizer-only Pruner
    handed to it trained the plain model, silently."""
    from secateurs.training import train as library_train

    def run(pruner_options):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        batches = [(torch.randn(16, 6), torch.randint(0, 3, (16,)))]
        pruner = secateurs.Pruner(model, **pruner_options) if pruner_options else None
        library_train(model, batches, 40, pruner=pruner)
        return sum(float(m.weight.abs().sum()) for m in (model[0], model[2]))

    assert run({"regularizer": "l1", "regularizer_options": {"strength": 1.0}}) < run({}) - 0.5
