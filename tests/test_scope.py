"""Scope resolves names and types to targets, with sensible defaults."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs import ScopeError, ScopeSpec, prune
from secateurs.scope import resolve


def names(model, **spec):
    return [t.module_name for t in resolve(model, ScopeSpec(**spec))]


def test_defaults_skip_the_input_stem_and_the_classifier(cnn):
    assert names(cnn) == ["3", "5", "8"]


def test_defaults_on_an_mlp_skip_only_the_classifier(mlp):
    assert names(mlp) == ["0", "2"]


def test_skips_can_be_turned_off(cnn):
    assert names(cnn, skip_first=False, skip_last=False) == ["0", "3", "5", "8", "10"]


def test_include_and_exclude_globs_and_regexes(cnn):
    assert names(cnn, include=["[35]"]) == ["3", "5"]
    assert names(cnn, exclude=["re:^[58]$"]) == ["3"]
    assert names(cnn, types=["Linear"]) == ["8"]


def test_embeddings_only_when_asked_and_tied_weights_once():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.body = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight

    model = LM()
    assert names(model) == ["body"]
    assert names(model, embeddings=True, skip_last=False) == ["embed", "body"]


def test_hf_conv1d_is_a_target_with_the_transposed_layout():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    targets = resolve(model, ScopeSpec())
    assert [t.module_name for t in targets] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                                "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]  # fmt: skip
    c_fc = targets[2]
    assert c_fc.canonical_shape == (64, 1, 16)  # (out, spatial, in) although stored (in, out)


def test_wanda_on_gpt2_conv1d_prunes_exactly_half_of_each_output_row():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    batches = [{"input_ids": torch.randint(0, 50, (2, 12))} for _ in range(2)]
    prune(model, "wanda", 0.5, calibration=batches)
    weight = model.transformer.h[0].mlp.c_fc.weight  # (in=16, out=64): rows of the math are columns here
    assert ((weight == 0).sum(dim=0) == 8).all()


def test_empty_scope_error_lists_what_was_skipped(cnn):
    with pytest.raises(ScopeError, match=r"skipped as first conv / classifier: \['0', '10'\]"):
        resolve(cnn, ScopeSpec(types=["Conv2d"], include=["0"]))


def test_bad_regex_is_refused():
    with pytest.raises(ScopeError, match="not a valid regex"):
        ScopeSpec(include=["re:(["])


def test_scope_accepts_a_list_of_globs(cnn):
    report = prune(cnn, "magnitude", 0.5, scope=["8"])
    assert [layer.name for layer in report.layers] == ["8.weight"]
    assert torch.count_nonzero(cnn[3].weight) == cnn[3].weight.numel()


class Net(nn.Module):
    """A feature extractor and a classifier that is itself a Sequential, as in torchvision's VGG."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.classifier = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.classifier(self.features(x))


def test_an_excluded_name_covers_every_module_inside_it():
    assert names(Net(), exclude=["classifier"], skip_last=False) == ["features.0", "features.2"]


def test_an_included_name_covers_every_module_inside_it():
    assert names(Net(), include=["features"]) == ["features.0", "features.2"]


def test_a_regex_that_matches_a_container_covers_its_children():
    assert names(Net(), exclude=["re:^feat"], skip_last=False) == ["classifier.0", "classifier.2"]


def test_the_readme_recipe_exclude_leaves_a_sequential_classifier_dense():
    model = Net()
    prune(model, "magnitude", 0.8, allocation="global", scope={"exclude": ["classifier"], "skip_last": False})
    assert all(bool((m.weight != 0).all()) for m in model.classifier if isinstance(m, nn.Linear))
    assert not bool((model.features[0].weight != 0).all())


@pytest.mark.parametrize("key", ["include", "exclude"])
def test_a_pattern_that_matches_no_module_is_refused_with_the_closest_names(key):
    with pytest.raises(ScopeError, match=rf"{key} pattern 'clasifier' matches no module of Net; did you mean "
                                         r"'classifier',"):  # fmt: skip
        resolve(Net(), ScopeSpec(**{key: ["clasifier"]}))


def test_removal_refuses_an_exclude_that_matches_nothing_before_changing_the_model():
    model = Net()
    before = [p.shape for p in model.parameters()]
    with pytest.raises(ScopeError, match=r"exclude pattern 'feature\.0' matches no module"):
        prune(model, "magnitude", 0.5, mode="remove", pattern="channel", example_inputs=torch.zeros(1, 8),
              scope={"exclude": ["feature.0"]}, progress=False)  # fmt: skip
    assert [p.shape for p in model.parameters()] == before
