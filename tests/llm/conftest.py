"""Tiny randomly initialised Hugging Face models (one per architecture family) and token data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 96
HIDDEN = 32
FFN = 64
CONTEXT = 64


def _gqa_decoder(model_cls: str, **extra):
    """Llama-family decoders share one config shape: grouped-query attention, 2 KV heads for 4 queries."""
    config = getattr(transformers, model_cls.replace("ForCausalLM", "Config"))(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT, **extra,
    )  # fmt: skip
    return getattr(transformers, model_cls)(config)


def _llama():
    return _gqa_decoder("LlamaForCausalLM")


def _mistral():
    return _gqa_decoder("MistralForCausalLM", sliding_window=16)


def _qwen2():
    return _gqa_decoder("Qwen2ForCausalLM")


def _opt():
    return transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=CONTEXT, word_embed_proj_dim=HIDDEN,
        )
    )  # fmt: skip


def _gpt2():
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=CONTEXT)
    )


def _bert():
    return transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=FFN, max_position_embeddings=CONTEXT,
        )
    )  # fmt: skip


ARCHITECTURES = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "opt": _opt, "gpt2": _gpt2, "bert": _bert}


def tiny(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ARCHITECTURES[name]().eval()


@pytest.fixture(params=list(ARCHITECTURES))
def any_model(request) -> tuple[str, torch.nn.Module]:
    return request.param, tiny(request.param)


@pytest.fixture
def llama() -> torch.nn.Module:
    return tiny("llama")


@pytest.fixture
def segments() -> torch.Tensor:
    """8 calibration segments of 32 token ids."""
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))


def state_bits(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict, as raw bits (so -0.0 != +0.0 and NaNs compare)."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().clone().contiguous()
        out[k] = v.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[v.element_size()])
    return out


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# The command-line tests' tiny Llama directory (with a BPE tokenizer trained on TEXT) and calibration file.
TEXT = "".join(f"def function_{i}(x):\n    return x * {i} + len('pruning')\n\n" for i in range(400))


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>"], show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tiny("llama").save_pretrained(path)
    _tokenizer(96).save_pretrained(path)
    return path


@pytest.fixture
def calib(tmp_path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return path
