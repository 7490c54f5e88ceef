"""Eigenpruning (arXiv:2404.03147): the SVD fold is exact, bad task data is refused before the
model changes, and the whole method runs on tiny GPT-2 and Llama models."""

from __future__ import annotations

import copy

import pytest
import torch

from secateurs.eigenprune import ComponentError, TaskError, eigenprune, select_lowest
from secateurs.eigenprune.components import find_components, weight_2d
from secateurs.errors import ConfigError

transformers = pytest.importorskip("transformers")
VOCAB = 40


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                     bos_token_id=None, eos_token_id=None)  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


MODELS = [tiny_gpt2, tiny_llama]
ALL = ("q", "k", "v", "o", "mlp_in", "mlp_out")


def task(n: int = 10, length: int = 5) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (n, length), generator=g).tolist(), torch.randint(
        0, VOCAB, (n,), generator=g
    ).tolist()


def logits(model: torch.nn.Module, prompts: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(prompts)).logits


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("make", MODELS)
def test_removing_nothing_leaves_outputs_identical(make):
    model = make()
    prompts, answers = task()
    before, weights = logits(model, prompts), state(model)
    report = eigenprune(model, prompts, answers, components=ALL, fraction=0.0)
    assert sum(report.removed.values()) == 0 and report.corrections == {}
    assert torch.equal(logits(model, prompts), before)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("make", MODELS)
def test_weights_lose_exactly_the_removed_rank_one_terms_and_biases_gain_their_mean(make):
    model = make()
    dense = copy.deepcopy(model)
    prompts, answers = task()
    report = eigenprune(model, prompts, answers, components=ALL, fraction=0.3)
    assert report.corrections
    for name, fix in report.corrections.items():
        old, new = dense.get_submodule(name), model.get_submodule(name)
        removed = weight_2d(old).double() - weight_2d(new).double()
        # the correction is a sum of s_k u_k v_k^T of the chosen components: rank = directions removed
        assert torch.allclose(removed, fix.delta(), atol=1e-6)
        assert torch.linalg.matrix_rank(fix.delta()).item() == fix.rank == report.removed_by_layer[name]
        # mean ablation: the bias gains the removed part applied to the mean clean input
        mean_input = _mean_input(dense, name, prompts)
        old_bias = torch.zeros(fix.bias_shift.shape, dtype=torch.float64) if old.bias is None else old.bias.double()
        assert torch.allclose(new.bias.double() - old_bias, fix.delta() @ mean_input, atol=1e-5)


def _mean_input(model: torch.nn.Module, name: str, prompts: list[list[int]]) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.append(a[0].double()))
    logits(model, prompts)
    handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).mean(0)


@pytest.mark.parametrize("make", MODELS)
def test_each_kind_loses_the_floor_of_its_fraction_of_singular_values(make):
    model = make()
    prompts, answers = task()
    report = eigenprune(model, prompts, answers, components=ALL, fraction=0.25)
    for kind in ALL:
        assert report.removed[kind] == int(report.total[kind] * 0.25)


@pytest.mark.parametrize("make", MODELS)
def test_restore_undoes_the_prune(make):
    model = make()
    prompts, answers = task()
    before, keys = logits(model, prompts), set(model.state_dict())
    report = eigenprune(model, prompts, answers, components=ALL, fraction=0.5)
    assert not torch.allclose(logits(model, prompts), before, atol=1e-4)
    report.restore(model)
    assert set(model.state_dict()) == keys  # biases the prune created are gone again
    assert torch.allclose(logits(model, prompts), before, atol=1e-5)


def test_selection_removes_the_lowest_scores_per_kind_across_layers():
    comps = find_components(tiny_llama(), ("k", "v"))
    scores = {c: torch.arange(16, dtype=torch.float64) * (i + 1) for i, c in enumerate(comps)}
    chosen = select_lowest(scores, 0.25)
    for kind in ("k", "v"):
        kept_max = max(scores[c][i].item() for c in comps if c.kind == kind for i in range(16) if i not in chosen[c])
        cut_max = max(scores[c][i].item() for c in comps if c.kind == kind for i in chosen[c].tolist())
        assert cut_max <= kept_max and sum(len(chosen[c]) for c in comps if c.kind == kind) == int(4 * 16 * 0.25)


def test_heads_are_split_by_the_config_for_fused_and_grouped_projections():
    gpt2 = {c.kind: c for c in find_components(tiny_gpt2(), ("q", "k", "v")) if c.head == 1 and c.block == 0}
    assert (gpt2["q"].rows, gpt2["k"].rows, gpt2["v"].rows) == (slice(8, 16), slice(40, 48), slice(72, 80))
    llama = find_components(tiny_llama(), ("k", "o"))
    assert sum(1 for c in llama if c.kind == "k") == 2 * 2 and sum(1 for c in llama if c.kind == "o") == 2 * 4


def test_a_corrupted_set_of_another_size_is_refused_and_the_model_untouched():
    model = tiny_gpt2()
    prompts, answers = task()
    weights = state(model)
    with pytest.raises(TaskError, match="10 clean prompts but 9 corrupted"):
        eigenprune(model, prompts, answers, corrupted=prompts[:9])
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_a_corrupted_prompt_of_another_length_is_refused():
    prompts, answers = task()
    corrupted = [p[:-1] if i == 3 else p for i, p in enumerate(prompts)]
    with pytest.raises(TaskError, match=r"prompts\[3\] is 5 tokens but corrupted\[3\] is 4"):
        eigenprune(tiny_gpt2(), prompts, answers, corrupted=corrupted)


class _CharTokenizer:
    """Every character is a token: ``"12"`` is two tokens."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(ch) % VOCAB for ch in text]}

    def decode(self, ids):
        return "".join(chr(i + 32) for i in ids)


def test_an_answer_of_several_tokens_is_refused_by_name():
    model = tiny_gpt2()
    weights = state(model)
    with pytest.raises(TaskError, match=r"answers\[1\]='12' is 2 tokens"):
        eigenprune(model, ["3 x 4 =", "2 x 6 ="], ["7", "12"], tokenizer=_CharTokenizer())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_text_without_a_tokenizer_is_refused():
    with pytest.raises(TaskError, match="no tokenizer"):
        eigenprune(tiny_gpt2(), ["3 x 4 ="], [12])


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan"), True])
def test_a_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(ConfigError, match="fraction="):
        eigenprune(tiny_gpt2(), *task(), fraction=fraction)


def test_one_kind_may_be_named_by_a_plain_string():
    report = eigenprune(tiny_gpt2(), *task(), components="mlp_in", fraction=0.3)
    assert report.components == ("mlp_in",) and report.removed["mlp_in"] == int(report.total["mlp_in"] * 0.3)


def test_an_unknown_reduction_is_refused():
    with pytest.raises(ConfigError, match="reduction='median'"):
        eigenprune(tiny_gpt2(), *task(), reduction="median")


def test_the_effect_is_the_gradient_times_the_activation_change_of_each_direction():
    """For the last MLP output layer the effect of direction k is s_k (g.u_k)(v_k.(x'-x)): check the
    mean reduction against this formula computed by hand with autograd."""
    model = tiny_gpt2()
    prompts, answers = task(4)
    corrupted = task(8)[0][4:]
    report = eigenprune(copy.deepcopy(model), prompts, answers, corrupted=corrupted, components=("mlp_out",),
                        fraction=0.0, reduction="mean")  # fmt: skip
    layer = model.transformer.h[1].mlp.c_proj
    seen = {}
    layer.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    with torch.no_grad():
        model(input_ids=torch.tensor(corrupted))
    dirty = seen["x"].double()
    loss = torch.nn.functional.cross_entropy(
        model(input_ids=torch.tensor(prompts)).logits[:, -1], torch.tensor(answers), reduction="sum"
    )
    (g,) = torch.autograd.grad(loss, seen["y"])
    u, s, vh = torch.linalg.svd(weight_2d(layer).double().detach(), full_matrices=False)
    effect = (g.double() @ u) * ((dirty - seen["x"].double().detach()) @ vh.T) * s
    assert torch.allclose(report.scores["transformer.h.1.mlp.c_proj (mlp_out)"], effect.mean(dim=(0, 1)), atol=1e-6)


def test_an_unknown_component_is_refused_with_the_choices():
    with pytest.raises(ComponentError, match="'mlp_in'"):
        eigenprune(tiny_gpt2(), *task(), components=("key",))


def test_a_lone_prompt_length_needs_explicit_corrupted_prompts():
    prompts, answers = task(4)
    prompts[0] = prompts[0] + [1]
    with pytest.raises(TaskError, match="only one prompt is 6 tokens"):
        eigenprune(tiny_gpt2(), prompts, answers)


def test_scoring_writes_no_gradient_and_keeps_the_training_flag():
    model = tiny_llama().train()
    prompts, answers = task()
    eigenprune(model, prompts, answers, fraction=0.3)
    assert model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_end_to_end_on_a_trained_model_removes_directions_the_task_does_not_use():
    """A tiny GPT-2 that learned ``answer = first token``: 30% of every kind of singular value goes,
    the outputs change, and the task the scores were taken on still works."""
    model = tiny_gpt2().train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (256, 4), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits[:, -1], x[:, 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = torch.randint(0, VOCAB, (128, 4), generator=g)
    accuracy = lambda m: (logits(m, test.tolist())[:, -1].argmax(-1) == test[:, 0]).double().mean().item()  # noqa: E731
    assert accuracy(model) > 0.95
    pruned = copy.deepcopy(model)
    report = eigenprune(pruned, x[:64].tolist(), x[:64, 0].tolist(), components=ALL, fraction=0.3)
    assert sum(report.removed.values()) == sum(int(n * 0.3) for n in report.total.values())
    assert not torch.allclose(logits(pruned, test.tolist()), logits(model, test.tolist()), atol=1e-3)
    assert accuracy(pruned) > 0.9


def test_an_eigenpruned_llama_saves_and_loads_back_with_plain_transformers(tmp_path):
    """k_proj had no bias: the config now says attention_bias=True and every attention projection has
    one (zero where nothing was folded), so from_pretrained does not drop the mean ablation."""
    model = tiny_llama()
    prompts, answers = task()
    eigenprune(model, prompts, answers, components=("k", "mlp_out"), fraction=0.3)
    assert model.config.attention_bias and model.config.mlp_bias
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(logits(loaded, prompts), logits(model, prompts), atol=1e-6)


def test_restore_also_takes_back_the_config_flags_and_zero_biases():
    model = tiny_llama()
    prompts, answers = task()
    keys = set(model.state_dict())
    eigenprune(model, prompts, answers, fraction=0.3).restore(model)
    assert not model.config.attention_bias and set(model.state_dict()) == keys
