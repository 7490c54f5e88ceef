"""Out-of-core pruning (secateurs.outofcore): a model read block by block from safetensors on disk gives the
bytes the in-memory block runner gives, and a run killed after a block resumes to the same bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from safetensors.torch import load_file  # noqa: E402

from secateurs import memory, outofcore  # noqa: E402
from secateurs.errors import ConfigError, StateError  # noqa: E402
from secateurs.llm import prune_llm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SEGMENTS = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))


def _llama(layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def on_disk(tmp_path) -> Path:
    _llama().save_pretrained(tmp_path / "in")
    return tmp_path / "in"


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.mark.parametrize(("method", "options"), [("wanda", {}), ("sparsegpt", {}), ("wanda", {"allocation": "owl"})])
def test_from_disk_gives_the_in_memory_bytes(on_disk, tmp_path, method, options):
    # OWL: a dense observation pass over every block from disk, then the pruning pass with its sparsities
    result = outofcore.prune_from_disk(on_disk, tmp_path / "out", method, 0.5, calibration=SEGMENTS, batch_size=2,
                                       progress=False, **options)  # fmt: skip
    assert result.blocks == 4 and result.resumed_from == 0
    assert not (tmp_path / "out.partial").exists()
    in_memory = _llama()
    prune_llm(in_memory, method, 0.5, calibration=SEGMENTS, batch_size=2, progress=False, **options)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    expected = in_memory.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    sparsities = {round(layer["sparsity"], 6) for layer in result.layers}
    assert sparsities == {0.5} if not options else len(sparsities) > 1  # OWL: per-layer sparsities differ


def test_an_owl_run_interrupted_after_its_observations_resumes_without_observing_again(on_disk, tmp_path, monkeypatch):
    def stop(i):
        if i == 1:
            raise KeyboardInterrupt

    options = {"calibration": SEGMENTS, "batch_size": 2, "progress": False, "allocation": "owl"}
    with pytest.raises(KeyboardInterrupt):
        outofcore.prune_from_disk(on_disk, tmp_path / "resumed", "wanda", 0.5, after_block=stop, **options)
    manifest = json.loads((tmp_path / "resumed.partial" / outofcore.MANIFEST).read_text())
    assert len(manifest["observed"]) == 4  # one outlier ratio per block
    observed = []
    real = outofcore._observe
    monkeypatch.setattr(outofcore, "_observe", lambda *a, **k: observed.append(1) or real(*a, **k))
    result = outofcore.prune_from_disk(on_disk, tmp_path / "resumed", "wanda", 0.5, **options)
    assert observed == [] and result.resumed_from == 2
    straight = outofcore.prune_from_disk(on_disk, tmp_path / "straight", "wanda", 0.5, **options)
    assert straight.layers == result.layers
    resumed, uninterrupted = _tensors(tmp_path / "resumed"), _tensors(tmp_path / "straight")
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name


_KILLED_RUN = """
import os, signal, sys, torch
from secateurs.outofcore import prune_from_disk
segments = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
def die(i):
    if i == 1:
        os.kill(os.getpid(), signal.SIGKILL)
prune_from_disk(sys.argv[1], sys.argv[2], "sparsegpt", 0.5, calibration=segments, batch_size=2, progress=False,
                after_block=die)
"""


def test_an_interrupted_run_resumes_to_the_uninterrupted_bytes(on_disk, tmp_path):
    def stop(i):
        if i == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        outofcore.prune_from_disk(on_disk, tmp_path / "resumed", "wanda", 0.5, calibration=SEGMENTS, batch_size=2,
                                  progress=False, after_block=stop)  # fmt: skip
    result = outofcore.prune_from_disk(on_disk, tmp_path / "resumed", "wanda", 0.5, calibration=SEGMENTS,
                                       batch_size=2, progress=False)  # fmt: skip
    assert result.resumed_from == 3 and len(result.layers) == 4 * 7
    outofcore.prune_from_disk(on_disk, tmp_path / "straight", "wanda", 0.5, calibration=SEGMENTS, batch_size=2,
                              progress=False)  # fmt: skip
    resumed, straight = _tensors(tmp_path / "resumed"), _tensors(tmp_path / "straight")
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


@pytest.mark.slow
def test_a_killed_run_resumes_after_its_last_block_to_the_uninterrupted_bytes(on_disk, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(on_disk), str(tmp_path / "resumed")], env=env,
                            capture_output=True, text=True, timeout=180)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "resumed").exists()
    work = tmp_path / "resumed.partial"
    assert sorted(p.name for p in work.glob("block-*")) == ["block-00000.safetensors", "block-00001.safetensors"]
    result = outofcore.prune_from_disk(on_disk, tmp_path / "resumed", "sparsegpt", 0.5, calibration=SEGMENTS,
                                       batch_size=2, progress=False)  # fmt: skip
    assert result.resumed_from == 2
    assert [layer["name"] for layer in result.layers][:1] == ["model.layers.0.self_attn.q_proj.weight"]
    outofcore.prune_from_disk(on_disk, tmp_path / "straight", "sparsegpt", 0.5, calibration=SEGMENTS, batch_size=2,
                              progress=False)  # fmt: skip
    resumed, straight = _tensors(tmp_path / "resumed"), _tensors(tmp_path / "straight")
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


_RESIDENT_RUN = """
import json, sys, torch, transformers
from secateurs import outofcore
from secateurs.memory import resident_kib
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=512, num_hidden_layers=16,
                                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
transformers.LlamaForCausalLM(config).save_pretrained(sys.argv[1])
anon = []
outofcore.prune_from_disk(sys.argv[1], sys.argv[2], "wanda", 0.5, calibration=torch.randint(0, 256, (2, 32)),
                          batch_size=1, progress=False, after_block=lambda i: anon.append(resident_kib()["RssAnon"]))
print(json.dumps(anon))
"""


@pytest.mark.slow
@pytest.mark.skipif(not memory.resident_kib() or not memory.release_freed_memory(), reason="glibc and /proc only")
def test_resident_memory_stays_flat_over_the_blocks(tmp_path):
    # Each block holds 7 weights of 1 MiB. Without release_freed_memory() after each block, glibc's heap kept
    # the freed pages and the private resident set grew by ~6 MiB per block (2026-11-30, 24 blocks: +131 MiB
    # from block 1 to 23); with it, +0.14 MiB. A fresh process: the heap's history is this run's alone.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-c", _RESIDENT_RUN, str(tmp_path / "in"), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    anon = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(anon) == 16
    block_kib = 7 * 512 * 512 * 4 // 1024
    assert anon[-1] - anon[1] < 2 * block_kib, anon


def test_resuming_with_other_settings_is_refused(on_disk, tmp_path):
    def stop(i):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        outofcore.prune_from_disk(on_disk, tmp_path / "out", "wanda", 0.5, calibration=SEGMENTS, progress=False,
                                  after_block=stop)  # fmt: skip
    with pytest.raises(StateError, match="another model, configuration or calibration"):
        outofcore.prune_from_disk(on_disk, tmp_path / "out", "wanda", 0.6, calibration=SEGMENTS, progress=False)


def test_no_room_for_the_output_is_refused_before_any_work(on_disk, tmp_path, monkeypatch):
    usage = outofcore.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(outofcore.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(outofcore.OutOfSpaceError, match=r"only 0\.00 GiB is free"):
        outofcore.prune_from_disk(on_disk, tmp_path / "out", "wanda", 0.5, calibration=SEGMENTS, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [({"mode": "mask"}, "mode='bake'"), ({"method": "flap"}, "runs on the whole model"),
     ({"allocation": "sensitivity"}, "without a profile measures one on the whole loaded model")],
)  # fmt: skip
def test_what_one_pass_from_disk_cannot_do_is_refused(on_disk, tmp_path, options, message):
    options = {"method": "wanda", "sparsity": 0.5, **options}
    with pytest.raises(ConfigError, match=message):
        outofcore.prune_from_disk(on_disk, tmp_path / "out", calibration=SEGMENTS, progress=False, **options)
    assert not (tmp_path / "out.partial").exists()


def test_a_directory_without_safetensors_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(ConfigError, match="no safetensors checkpoint"):
        outofcore.Checkpoint(tmp_path / "in")
