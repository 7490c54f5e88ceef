"""One rank of a distributed test run (launched by torchrun, or as a plain process with torchrun's environment).

``python _rank_worker.py SCENARIO OUT``: prunes the tiny Llama of ``tests/llm/conftest.py`` with prune_llm and
writes what the test compares under OUT (rank-suffixed), or the error this rank stopped with.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.llm.conftest
from tests.llm.conftest import tiny

import secateurs
from secateurs import distributed
from secateurs.blocks import capture_inputs
from secateurs.evidence import Need, gather_block
from secateurs.llm import prune_llm
from secateurs.scope import ScopeSpec, resolve


def segments() -> torch.Tensor:
    return torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))


#: (file name, method, options) of the runs whose activation statistics are added over the ranks
STATISTICS_RUNS = [
    ("owl", "wanda", {"sparsity": 0.6, "allocation": "owl"}),
    ("flap", "flap", {"sparsity": 0.3}),
    ("shortgpt", "shortgpt", {"sparsity": 0.5}),
]


def block0_hessian(rank: int) -> torch.Tensor:
    """The Hessian of block 0's q_proj from this rank's shard, added over the ranks (one process: all segments)."""
    model = tiny("llama")
    blocks = list(model.model.layers)
    batches = list(segments().split(2))
    if torch.distributed.is_initialized():
        batches = distributed.shard(batches, distributed.detect())
    inputs = capture_inputs(model, blocks, batches)
    targets = [t for t in resolve(model, ScopeSpec(include=("model.layers.0.self_attn.q_proj",)))]
    needs = frozenset({Need.HESSIAN})
    if torch.distributed.is_initialized():
        _, hessians = distributed.gather_block(distributed.detect(), blocks[0], 0, targets, inputs, needs)
    else:
        _, hessians = gather_block(blocks[0], 0, targets, inputs, needs)
    return hessians[targets[0].name].hessian.contiguous()


def main(scenario: str, out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    try:
        if scenario == "same":
            for method in ("wanda", "sparsegpt"):
                model = tiny("llama")
                prune_llm(model, method, 0.5, calibration=segments(), batch_size=2, progress=False)
                save_file(
                    {k: v.contiguous() for k, v in model.state_dict().items()}, out / f"{method}-{rank}.safetensors"
                )
            save_file({"hessian": block0_hessian(rank)}, out / f"hessian-{rank}.safetensors")
            model = tiny("llama")
            prune_llm(model, "sparsegpt", pattern="2:4", calibration=segments(), batch_size=2, progress=False)
            save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()}, out / f"sparsegpt24-{rank}.safetensors"
            )
        elif scenario == "statistics":  # OWL's observations, FLAP's fluctuations, ShortGPT's block influence
            for name, method, options in STATISTICS_RUNS:
                model = tiny("llama")
                prune_llm(model, method, calibration=segments(), batch_size=2, progress=False, **options)
                state = {k: v.contiguous() for k, v in model.state_dict().items()}
                save_file(state, out / f"{name}-{rank}.safetensors")
        elif scenario == "refused":  # a removal whose statistics are not sums: refused alike on every rank
            prune_llm(tiny("llama"), "taylor", 0.3, mode="remove", calibration=segments(), batch_size=2, progress=False)
        elif scenario == "mismatch":
            prune_llm(tiny("llama"), "wanda", 0.5 if rank == 0 else 0.6, calibration=segments(), progress=False)
        elif scenario == "die":
            model = tiny("llama")
            if rank == 1:  # this rank dies as block 1 starts; rank 0 must stop with a clear error
                model.model.layers[1].register_forward_pre_hook(lambda *a: os._exit(3))
            before = {k: v.clone() for k, v in model.state_dict().items()}
            try:
                prune_llm(model, "sparsegpt", 0.5, calibration=segments(), batch_size=2, progress=False)
            finally:
                same = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
                (out / f"restored-{rank}.txt").write_text(str(same))
        (out / f"ok-{rank}.txt").write_text("ok")
    except secateurs.SecateursError as exc:
        (out / f"error-{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        sys.exit(2)
    assert isinstance(distributed.detect(), distributed.Group)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
