"""Distributed calibration and solving (secateurs.distributed) on 2 CPU ranks over gloo.

Each test launches real processes: ``torchrun --nproc_per_node 2`` for the equivalence test, two plain
processes with torchrun's environment for the refusals (torchrun would kill the surviving rank as soon as
one dies, hiding what it reports). The arithmetic: Wanda's statistics are float64 sums of exact float32
products, added over the ranks; SparseGPT's float32 Hessian sums are handed on rank after rank (the single
process's order), so both give the single-process weights bit for bit here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file
from tests.llm.conftest import tiny
from tests.scaling._rank_worker import STATISTICS_RUNS, block0_hessian, segments

from secateurs import distributed
from secateurs.llm import prune_llm

WORKER = Path(__file__).with_name("_rank_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _torchrun(scenario: str, out: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", _env()["MASTER_PORT"], str(WORKER), scenario, str(out)]  # fmt: skip
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)


def _two_ranks(scenario: str, out: Path, timeout: float = 120) -> list[int]:
    """Two plain processes with torchrun's environment; their exit codes."""
    env = _env()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(out)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for r in (0, 1)
    ]
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_single_process_masks(tmp_path):
    done = _torchrun("same", tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for method, options in [("wanda", {"sparsity": 0.5}), ("sparsegpt", {"sparsity": 0.5}),
                            ("sparsegpt24", {"pattern": "2:4"})]:  # fmt: skip
        model = tiny("llama")
        prune_llm(model, method.removesuffix("24"), calibration=segments(), batch_size=2, progress=False, **options)
        single = model.state_dict()
        ranks = [load_file(tmp_path / f"{method}-{r}.safetensors") for r in (0, 1)]
        for name, tensor in ranks[0].items():
            assert torch.equal(tensor, ranks[1][name]), f"{method}: ranks differ on {name}"
            assert torch.equal(tensor == 0, single[name] == 0), f"{method}: mask of {name} differs from one process"
            assert torch.equal(tensor, single[name]), f"{method}: {name} is not bit-identical to one process"
    for rank in (0, 1):
        assert torch.equal(load_file(tmp_path / f"hessian-{rank}.safetensors")["hessian"], block0_hessian(0))


@pytest.mark.slow
def test_owl_flap_and_shortgpt_statistics_added_over_two_ranks_give_the_single_process_result(tmp_path):
    # OWL's outlier ratios, FLAP's input fluctuations (sums, sums of squares, token counts) and ShortGPT's block
    # influence (sums of 1 - cos, token counts) are added over the ranks, so the same units and blocks go
    done = _torchrun("statistics", tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name, method, options in STATISTICS_RUNS:
        model = tiny("llama")
        prune_llm(model, method, calibration=segments(), batch_size=2, progress=False, **options)
        single = model.state_dict()
        ranks = [load_file(tmp_path / f"{name}-{r}.safetensors") for r in (0, 1)]
        assert ranks[0].keys() == ranks[1].keys() == single.keys(), f"{name}: other blocks removed"
        for key, tensor in ranks[0].items():
            assert torch.equal(tensor, ranks[1][key]), f"{name}: ranks differ on {key}"
            assert tensor.shape == single[key].shape, f"{name}: {key} lost other units than in one process"
            assert torch.equal(tensor == 0, single[key] == 0), f"{name}: mask of {key} differs from one process"
            # float64 sums added in another order: FLAP's compensating biases may differ in the last bits
            torch.testing.assert_close(tensor, single[key], rtol=1e-6, atol=1e-7, msg=f"{name}: {key}")
    shortgpt = load_file(tmp_path / "shortgpt-0.safetensors")
    assert len({k.split(".")[2] for k in shortgpt if k.startswith("model.layers.")}) < len(tiny("llama").model.layers)


@pytest.mark.slow
def test_a_removal_whose_statistics_are_not_sums_is_refused_on_every_rank(tmp_path):
    assert _two_ranks("refused", tmp_path) == [2, 2]
    messages = [(tmp_path / f"error-{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1]
    assert "removal by 'taylor' reads ['data_passes'], which are not added over ranks" in messages[0]


@pytest.mark.slow
def test_ranks_that_disagree_are_refused_on_every_rank_with_one_message(tmp_path):
    assert _two_ranks("mismatch", tmp_path) == [2, 2]
    messages = [(tmp_path / f"error-{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1]
    assert messages[0].startswith("DistributedError: the 2 ranks disagree on config")


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_other_with_a_clear_error_and_its_model_restored(tmp_path):
    codes = _two_ranks("die", tmp_path, timeout=90)
    assert codes[1] == 3  # the dying rank
    assert codes[0] == 2
    message = (tmp_path / "error-0.txt").read_text()
    assert message.startswith("DistributedError: rank 0 of 2: the collective")
    assert "another rank stopped" in message
    assert (tmp_path / "restored-0.txt").read_text() == "True"


def test_shards_split_the_batches_contiguously_and_refuse_too_few():
    batches = list(range(7))
    shards = [distributed.shard(batches, distributed.Group(r, 3, "gloo")) for r in range(3)]
    assert shards == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(distributed.ConfigError, match="2 calibration batch"):
        distributed.shard([0, 1], distributed.Group(0, 3, "gloo"))


def test_owners_keep_layers_sharing_a_hessian_together_and_balance_cost():
    from secateurs.evidence import Evidence
    from secateurs.scope import resolve

    model = tiny("llama")
    targets = [t for t in resolve(model, distributed_scope()) if ".layers.0." in t.name]
    shared = object()
    hessians = {t.name: shared for t in targets if "self_attn.q_proj" in t.name or "k_proj" in t.name
                or "v_proj" in t.name}  # fmt: skip
    owner = distributed.assign_owners(targets, Evidence(model=model, targets=targets, hessians=hessians), 2)
    qkv = {owner[n] for n in hessians}
    assert len(qkv) == 1
    loads = [sum(distributed.solve_cost(t) for t in targets if owner[t.name] == r) for r in (0, 1)]
    assert min(loads) > 0


def distributed_scope():
    from secateurs.scope import ScopeSpec

    return ScopeSpec(include=("model.layers.*",))


def test_backend_is_nccl_for_cuda_where_torch_has_it_else_gloo():
    assert distributed.backend_for("cpu") == "gloo"
    assert distributed.backend_for(None) == "gloo"
    expected = "nccl" if torch.distributed.is_nccl_available() else "gloo"
    assert distributed.backend_for("cuda") == expected


def test_a_single_process_has_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.detect() is None


def test_block_influence_adds_each_share_s_sums_and_token_counts_before_the_mean():
    # ShortGPT under two ranks, in one process: rank 0 scores 3 batches, "rank 1" 1 batch of another length; the
    # mean over all tokens (not the mean of the two ranks' means) is the single-process block influence
    from secateurs.structural.layers import _influence_sums, block_influence

    model = tiny("llama")
    blocks = list(model.model.layers)
    batches = [*segments()[:6].split(2), segments()[6:, :16]]
    other = _influence_sums(model, blocks, batches[3:], False)

    def add_other_rank(tensors):
        for mine, theirs in zip(tensors, other):
            mine += theirs

    shared = block_influence(model, blocks, batches[:3], sum_over_ranks=add_other_rank)
    assert torch.equal(shared, block_influence(model, blocks, batches))
    mean_of_means = (block_influence(model, blocks, batches[:3]) + block_influence(model, blocks, batches[3:])) / 2
    assert not torch.allclose(shared, mean_of_means)
