"""The Ray backend: cells as Ray tasks on a local Ray instance give the same profile as the local path."""

from __future__ import annotations

import pytest

from secateurs.analysis import sensitivity

ray = pytest.importorskip("ray")


@pytest.fixture
def local_ray():
    """A Ray instance on this machine only (127.0.0.1), started and stopped by the test."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1", configure_logging=False
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow  # starting Ray takes 10-30 s on a busy machine
def test_the_ray_path_yields_the_same_profile_as_the_local_path(local_ray, mlp, mlp_batches):
    local = sensitivity(mlp, mlp_batches, sparsities=(0.3, 0.7), progress=False)
    remote = sensitivity(mlp, mlp_batches, sparsities=(0.3, 0.7), backend="ray", workers=2, progress=False)
    key = lambda c: (c.target, c.sparsity)  # noqa: E731
    assert [(c.target, c.sparsity, c.metric, c.params, c.macs) for c in sorted(local.cells, key=key)] == [
        (c.target, c.sparsity, c.metric, c.params, c.macs) for c in sorted(remote.cells, key=key)
    ]
    assert remote.baseline == local.baseline
