"""A parameter shared by several modules is one target: every module that holds it sees the same
mask, in mask, bake, save/load and unmask (ARCHITECTURE invariant 7)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import secateurs
from conftest import assert_unchanged, fingerprint
from secateurs import ScopeError
from secateurs.masking import current_mask, masked_targets
from secateurs.scope import ScopeSpec, resolve

ALL = {"skip_first": False, "skip_last": False}


class Chain(nn.Module):
    """Linear layers applied in order; ``ties[i] = j`` makes layer i use layer j's weight."""

    def __init__(self, n: int, ties: list[int], width: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n))
        for i, j in enumerate(ties):
            if j != i:
                self.layers[i].weight = self.layers[j].weight

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.embed(ids))))


def _effective(module: nn.Module) -> torch.Tensor:
    return module.weight.detach()


def test_every_holder_of_a_tied_weight_is_masked_with_one_mask():
    torch.manual_seed(0)
    model = Chain(3, [0, 0, 2])
    secateurs.prune(model, "magnitude", 0.5, scope=ALL, progress=False)
    a, b = model.layers[0], model.layers[1]
    assert torch.equal(_effective(a), _effective(b))  # b computed with the dense weight before
    assert (_effective(b) == 0).float().mean() == 0.5
    (target,) = [t for t in masked_targets(model) if t.module is a]
    assert target.tied_names == ["layers.1.weight"]
    assert a.parametrizations.weight[0].mask is b.parametrizations.weight[0].mask


def test_an_optimizer_step_cannot_revive_a_tied_weight_through_its_other_holder():
    torch.manual_seed(0)
    model = Chain(3, [0, 0, 2])
    secateurs.prune(model, "magnitude", 0.5, scope=ALL, progress=False)
    keep = current_mask(resolve(model, ScopeSpec(**ALL))[0]).clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).pow(2).sum().backward()
        shared = model.layers[0].parametrizations.weight.original
        assert bool((shared.grad[~keep] == 0).all()), "a pruned entry got a gradient through the second holder"
        optimizer.step()
    for layer in model.layers[:2]:
        assert bool((_effective(layer)[~keep] == 0).all())


def test_tied_embeddings_and_lm_head_are_one_target_even_when_the_head_is_skipped_by_default():
    torch.manual_seed(0)
    model = LM()
    report = secateurs.prune(model, "magnitude", 0.5, scope={"embeddings": True}, progress=False)
    assert [layer.name for layer in report.layers] == ["embed.weight", "body.weight"]
    assert torch.equal(_effective(model.head), _effective(model.embed))
    assert (_effective(model.head) == 0).float().mean() == 0.5


def test_excluding_one_holder_of_a_tied_weight_is_refused():
    model = LM()
    before = fingerprint(model)
    with pytest.raises(ScopeError, match=r"embed.weight is tied to head.weight.*excludes"):
        secateurs.prune(model, "magnitude", 0.5, scope={"embeddings": True, "exclude": ["head"]}, progress=False)
    assert_unchanged(model, before)


def test_bake_keeps_the_tie_and_the_original_keys():
    torch.manual_seed(0)
    model = LM()
    keys = list(model.state_dict())
    secateurs.prune(model, "magnitude", 0.5, scope={"embeddings": True}, mode="bake", progress=False)
    assert list(model.state_dict()) == keys
    assert model.head.weight is model.embed.weight
    assert (model.head.weight == 0).float().mean() == 0.5


def test_unmask_restores_the_dense_tie_exactly():
    torch.manual_seed(0)
    model = LM()
    before = fingerprint(model)
    shared = model.embed.weight
    secateurs.prune(model, "magnitude", 0.5, scope={"embeddings": True}, progress=False)
    assert secateurs.unmask(model) == 2  # embed (with its tied head) and body
    assert model.head.weight is shared and model.embed.weight is shared
    assert_unchanged(model, before)


def test_saved_masks_of_a_tied_weight_load_onto_every_holder(tmp_path):
    torch.manual_seed(0)
    model = LM()
    secateurs.prune(model, "magnitude", 0.5, scope={"embeddings": True}, progress=False)
    secateurs.save_masks(model, tmp_path / "m.safetensors")
    fresh = LM()
    assert sorted(secateurs.load_masks(fresh, tmp_path / "m.safetensors")) == ["body.weight", "embed.weight"]
    assert torch.equal(_effective(fresh.head) == 0, _effective(model.head) == 0)
    assert fresh.head.parametrizations.weight[0].mask is fresh.embed.parametrizations.weight[0].mask


def test_gpt2_tied_head_is_masked_with_its_embeddings():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    secateurs.prune(model, "magnitude", 0.5, scope={"embeddings": True, "types": []}, progress=False)
    assert torch.equal(_effective(model.lm_head) == 0, _effective(model.transformer.wte) == 0)
    ids = torch.randint(0, 64, (1, 8))
    hidden = model.transformer(ids).last_hidden_state
    torch.testing.assert_close(model(ids).logits, hidden @ _effective(model.transformer.wte).T)


@settings(max_examples=40, deadline=None)
@given(
    ties=st.integers(2, 6).flatmap(lambda n: st.tuples(*[st.integers(0, i) for i in range(n)])),
    sparsity=st.sampled_from([0.25, 0.5, 0.75]),
    mode=st.sampled_from(["mask", "bake"]),
)
def test_any_tie_structure_gives_every_holder_the_same_weights(ties, sparsity, mode):
    """Random tie structures: layer i uses the weight of layer ties[i] <= i (a root ties to itself)."""
    roots = [ties[i] if ties[ties[i]] == ties[i] else ties[ties[i]] for i in range(len(ties))]
    while any(roots[r] != r for r in roots):
        roots = [roots[r] for r in roots]
    torch.manual_seed(len(ties))
    model = Chain(len(ties), roots)
    dense = {id(p): p.detach().clone() for p in model.parameters()}
    report = secateurs.prune(model, "magnitude", sparsity, scope=ALL, mode=mode, progress=False)
    assert len(report.layers) == len(set(roots))  # one target per tensor
    for i, r in enumerate(roots):
        assert torch.equal(_effective(model.layers[i]), _effective(model.layers[r]))
        assert (_effective(model.layers[i]) == 0).float().mean() == sparsity
    if mode == "mask":
        model(torch.randn(2, 8)).sum().backward()
        for t in masked_targets(model):
            assert bool((t.parameter.grad[~current_mask(t)] == 0).all())
        secateurs.unmask(model)
        for i, r in enumerate(roots):
            assert model.layers[i].weight is model.layers[r].weight
            assert torch.equal(model.layers[i].weight.detach(), dense[id(model.layers[i].weight)])
    else:
        for i, r in enumerate(roots):
            assert model.layers[i].weight is model.layers[r].weight


def test_a_weight_shared_by_two_layers_is_calibrated_on_both_inputs():
    """The same W multiplies both layers' inputs, so its activation statistics and its Hessian sum both."""
    import secateurs
    from secateurs.evidence import Need, StatsCollector
    from secateurs.scope import ScopeSpec, resolve

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
            self.b.weight = self.a.weight  # one tensor, two modules

        def forward(self, x):
            return self.b(self.a(x))

    model = Shared()
    (target,) = resolve(model, ScopeSpec(skip_first=False, skip_last=False))
    x = torch.randn(6, 4)
    with StatsCollector([target], frozenset({Need.ACTIVATIONS, Need.HESSIAN})) as collector:
        hidden = model.a(x)
        model.b(hidden)
        collector.end_batch()
    activations, hessians = collector.result()
    both = torch.cat([x, hidden.detach()])
    torch.testing.assert_close(activations[target.name].input_norm.float(), both.square().sum(0).sqrt())
    torch.testing.assert_close(hessians[target.name].hessian, 2 * both.t() @ both / 12)
    report = secateurs.prune(model, "sparsegpt", 0.5, calibration=[x], scope={"skip_first": False, "skip_last": False},
                             progress=False)  # fmt: skip
    assert report.layers[0].sparsity == 0.5 and model.a.weight is model.b.weight


class TwoInputs(nn.Module):
    """``a`` and ``b`` share one weight but see inputs with means +3 and -3 (``up`` feeds both)."""

    def __init__(self, bias_b: bool = True) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.a, self.b = nn.Linear(16, 8), nn.Linear(16, 8, bias=bias_b)
        self.b.weight = self.a.weight
        self.head = nn.Linear(16, 2)

    def hidden(self, x):
        return torch.relu(self.up(x))

    def holders(self, x):
        h = self.hidden(x)
        return self.a(h + 3.0), self.b(h - 3.0)

    def forward(self, x):
        return self.head(torch.cat(self.holders(x), -1))


def _batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 8, generator=g), torch.zeros(32, dtype=torch.long)) for _ in range(4)]


@pytest.mark.parametrize(
    ("mode", "scope"), [("reconstruct", ["a", "b"]), ("remove", ["up"])], ids=["reconstruct", "remove"]
)
def test_bias_compensation_corrects_each_holder_of_a_tied_weight_by_its_own_inputs(mode, scope):
    """Each holder's mean output is kept: its own input mean goes into its own bias (reconstruct prunes the
    tied weight; remove cuts the channels of ``up`` that both holders read)."""
    torch.manual_seed(0)
    model = TwoInputs()
    x = torch.cat([b for b, _ in _batches()])
    with torch.no_grad():
        before = [y.mean(0) for y in model.holders(x)]
    secateurs.prune(model, "magnitude", 0.5, mode=mode, solver="bias_compensation", scope=scope, calibration=_batches(),
                    structural={"latency": False} if mode == "remove" else None, progress=False)  # fmt: skip
    assert model.a.weight is model.b.weight
    with torch.no_grad():
        for y, mean in zip(model.holders(x), before):
            torch.testing.assert_close(y.mean(0), mean, rtol=1e-4, atol=1e-4)


def test_bias_compensation_refuses_a_tied_holder_without_a_bias_naming_it():
    torch.manual_seed(0)
    model = TwoInputs(bias_b=False)
    before = fingerprint(model)
    with pytest.raises(secateurs.ConfigError, match=r"'b' \(which shares a.weight\) has no bias to fold"):
        secateurs.prune(model, "magnitude", 0.5, mode="reconstruct", solver="bias_compensation", scope=["a", "b"],
                        calibration=_batches(), progress=False)  # fmt: skip
    assert_unchanged(model, before)


def test_a_solver_that_corrects_one_holder_of_a_tied_weight_is_refused_before_any_write():
    from secateurs.solvers import BiasCompensation, SolveResult

    class FirstHolderOnly(BiasCompensation):
        def solve(self, targets, evidence, masks, sparsities=None, pattern=None):
            results = super().solve(targets, evidence, masks, sparsities, pattern)
            return {name: SolveResult(r.keep, r.weight, r.bias_delta) for name, r in results.items()}

    torch.manual_seed(0)
    model = TwoInputs()
    before = fingerprint(model)
    with pytest.raises(secateurs.ConfigError, match=r"tied weight a.weight but not 'b'"):
        secateurs.prune(model, "magnitude", 0.5, mode="reconstruct", solver=FirstHolderOnly(), scope=["a", "b"],
                        calibration=_batches(), progress=False)  # fmt: skip
    assert_unchanged(model, before)
