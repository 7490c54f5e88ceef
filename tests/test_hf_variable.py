"""Models with layers of different widths (FLAP, low rank) load with plain ``from_pretrained``:
with ``trust_remote_code=True`` where secateurs is not installed, without it where secateurs is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from secateurs.errors import ConfigError
from secateurs.hf_variable import save_pretrained_variable, variable_layout
from secateurs.llm import prune_heads_and_neurons
from secateurs.lowrank import factorize
from secateurs.structural import load_structured, save_structured

transformers = pytest.importorskip("transformers")

IDS = torch.arange(24).reshape(2, 12) * 5 % 97


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def _calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (1, 24), generator=g) for _ in range(4)]


def _flap_and_low_rank(model: torch.nn.Module, low_rank: str) -> torch.Tensor:
    prune_heads_and_neurons(model, 0.4, calibration=_calibration(), progress=False, method="flap")
    factorize(model, 4, method="whitened", calibration=_calibration(), scope={"include": [low_rank]})
    with torch.no_grad():
        return model(IDS).logits


def _saved(tmp_path, build, low_rank) -> tuple[str, torch.Tensor]:
    model = build()
    logits = _flap_and_low_rank(model, low_rank)
    path = tmp_path / type(model).__name__
    save_pretrained_variable(model, path)
    return str(path), logits


def test_flap_leaves_layers_that_a_standard_config_cannot_express():
    model = _llama()
    prune_heads_and_neurons(model, 0.4, calibration=_calibration(), progress=False, method="flap")
    _, modules, _ = variable_layout(model)
    widths = [model.model.layers[i].mlp.up_proj.out_features for i in range(3)]
    assert len(set(widths)) > 1  # different widths per layer
    assert sorted(s["out"] for n, s in modules.items() if n.endswith("mlp.up_proj")) == sorted(
        w for w in widths if w != 64
    )


@pytest.mark.parametrize(
    ("build", "low_rank"), [(_llama, "model.layers.1.mlp.down_proj"), (_gpt2, "transformer.h.1.mlp.c_fc")]
)
def test_saved_model_loads_with_plain_from_pretrained_when_secateurs_is_imported(tmp_path, build, low_rank):
    path, logits = _saved(tmp_path, build, low_rank)
    with open(os.path.join(path, "config.json")) as file:
        config = json.load(file)
    assert config["model_type"].startswith("secateurs_") and "auto_map" in config
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, logits, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in build().parameters())


_WITHOUT_SECATEURS = """
import sys, torch
sys.modules["secateurs"] = None  # not installed: importing it fails
import transformers
ids = torch.arange(24).reshape(2, 12) * 5 % 97
for path, out in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        transformers.AutoModelForCausalLM.from_pretrained(path)
        raise SystemExit("loaded without trust_remote_code and without secateurs")
    except ValueError as exc:
        assert "trust_remote_code" in str(exc), exc
    model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.save(model(ids).logits, out)
"""


def _load_in_a_fresh_process(tmp_path, script: str, *first: str) -> None:
    """Save a FLAP + low-rank Llama and GPT-2, run ``script`` in a fresh interpreter with ``first`` and then
    (path, logits file) pairs, and check the logits it computed from each loaded model equal the originals."""
    saved = [
        _saved(tmp_path, _llama, "model.layers.1.mlp.down_proj"),
        _saved(tmp_path, _gpt2, "transformer.h.1.mlp.c_fc"),
    ]
    argv = list(first)
    for i, (path, _) in enumerate(saved):
        argv += [path, str(tmp_path / f"logits{i}.pt")]
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for i, (_, logits) in enumerate(saved):
        torch.testing.assert_close(
            torch.load(tmp_path / f"logits{i}.pt", weights_only=True), logits, rtol=1e-5, atol=1e-5
        )


def test_saved_models_load_with_trust_remote_code_where_secateurs_is_not_installed(tmp_path):
    _load_in_a_fresh_process(tmp_path, _WITHOUT_SECATEURS)


def test_save_structured_writes_the_variable_config_for_a_flap_model(tmp_path):
    model = _llama()
    prune_heads_and_neurons(model, 0.4, calibration=_calibration(), progress=False, method="flap")
    with torch.no_grad():
        logits = model(IDS).logits
    save_structured(model, tmp_path / "flap")
    plan = json.loads((tmp_path / "flap" / "pruning_plan.json").read_text())
    assert plan["config_expressible"] is False and plan["variable_width"] is True
    for loaded in (
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "flap"),
        load_structured(tmp_path / "flap"),
    ):
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(IDS).logits, logits, rtol=1e-5, atol=1e-5)


def test_an_unsupported_family_is_refused_before_writing(tmp_path):
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)  # fmt: skip
    with pytest.raises(ConfigError, match="no variable-width form"):
        save_pretrained_variable(transformers.BertModel(config), tmp_path / "bert")
    assert not (tmp_path / "bert").exists()


_FRESH_PROCESS = """
import sys
order = sys.argv[1]
if order == "transformers first":
    import transformers
    transformers.AutoConfig  # the Auto mapping exists before secateurs is imported
    import secateurs
else:
    import secateurs, transformers
    assert "torch" not in sys.modules, "registering imported torch"
    transformers.AutoConfig
import torch
assert not [m for m in sys.modules if m.startswith("transformers.models.") and ".modeling_" in m], "model code loaded"
ids = torch.arange(24).reshape(2, 12) * 5 % 97
for path, out in zip(sys.argv[2::2], sys.argv[3::2]):
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()  # no trust_remote_code
    assert type(model).__module__ == "secateurs.modeling_secateurs", type(model)
    with torch.no_grad():
        torch.save(model(ids).logits, out)
from secateurs import modeling_secateurs  # a class built directly, not through a placeholder, is registered too
config = modeling_secateurs.SecateursOPTConfig(vocab_size=97, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                               num_attention_heads=2, word_embed_proj_dim=16)
assert type(transformers.AutoModelForCausalLM.from_config(config)).__name__ == "SecateursOPTForCausalLM"
import pickle
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
pickle.dumps(CONFIG_MAPPING)  # placeholders pickle by reference
"""


@pytest.mark.parametrize("order", ["secateurs first", pytest.param("transformers first", marks=pytest.mark.slow)])
def test_a_fresh_process_registers_lazily_and_loads_without_trust_remote_code(tmp_path, order):
    """Registering imports neither torch (before the Auto mapping is used) nor any model code; the placeholder
    builds the real classes when a saved config is read, whichever of the two packages is imported first."""
    _load_in_a_fresh_process(tmp_path, _FRESH_PROCESS, order)


def test_the_lazy_registration_knows_every_variable_width_family():
    from secateurs import _auto, modeling_secateurs

    assert set(_auto.FAMILIES) == set(modeling_secateurs.FAMILIES)
    assert _auto.PREFIX == modeling_secateurs.PREFIX
