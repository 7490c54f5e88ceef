"""Outputs survive SIGKILL: ``--out`` always holds the complete old or the complete new output, and
the next run removes whatever a killed one left. Each kill runs the real CLI in a forked child
(warm imports, so a run takes tens of milliseconds) and kills it either after a seeded random delay
or just before a seeded random file operation on the output area (counted with an audit hook)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import secateurs.io as sio
from secateurs.cli import main
from secateurs.errors import StateError
from secateurs.io import atomic_dir, atomic_path, recover

FORK = multiprocessing.get_context("fork") if hasattr(os, "fork") else None
pytestmark = pytest.mark.skipif(FORK is None or not hasattr(sio, "fcntl") or sio.fcntl is None, reason="POSIX only")


def wide_mlp() -> nn.Module:
    """Big enough that writing it takes a measurable share of a run."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def _argv(out: Path, sparsity: float) -> list[str]:
    return ["prune", f"{__name__}:wide_mlp", "--sparsity", str(sparsity), "--out", str(out), "--overwrite"]


def _digest(path: Path) -> str:
    """A file's content hash; for safetensors, of its tensors and metadata as parsed (the library
    writes the metadata in a per-process hash order, so the bytes differ between equal runs). A
    truncated file fails to parse here, and so fails the test. A report's wall-clock timings differ
    between equal runs too; the rest of it is compared (a truncated report fails to parse)."""
    if path.name == "report.json":
        report = json.loads(path.read_text())
        report.get("details", {}).pop("seconds", None)
        return hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()
    if path.suffix != ".safetensors":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        digest.update(repr(sorted((f.metadata() or {}).items())).encode())
        for key in sorted(f.keys()):
            digest.update(key.encode() + f.get_tensor(key).numpy().tobytes())
    return digest.hexdigest()


def manifest(folder: Path) -> dict[str, str] | None:
    """Every file's content hash; None when ``folder`` is missing."""
    if not folder.is_dir():
        return None
    return {p.name: _digest(p) for p in sorted(folder.iterdir())}


def _touches(args: tuple, root: bytes) -> bool:
    for a in args:
        if isinstance(a, (tuple, list)):
            if _touches(a, root):
                return True
        elif isinstance(a, (str, bytes, os.PathLike)) and os.fsencode(a).startswith(root):
            return True
    return False


def _child(argv: list[str], root: str, kill_at: int, counter, no_exchange: bool) -> None:
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the process ends below)
    if no_exchange:
        sio._exchange = lambda a, b: False
    prefix = os.fsencode(root)

    def hook(event: str, args: tuple) -> None:
        if event.startswith(("os.", "shutil.", "open", "tempfile.", "ctypes.call")) and _touches(args, prefix):
            counter.value += 1
            if counter.value == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # just before this file operation runs

    sys.addaudithook(hook)
    main(argv)


def _run(argv, root: Path, kill_at: int = 0, delay: float | None = None, no_exchange: bool = False) -> int:
    """Run the CLI in a forked child; return how many file operations it reached (all of them when
    neither ``kill_at`` nor ``delay`` stopped it)."""
    counter = FORK.Value("i", 0)
    child = FORK.Process(target=_child, args=(argv, str(root), kill_at, counter, no_exchange))
    child.start()
    if delay is not None:
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
    child.join(timeout=120)
    if child.is_alive():  # fork after a multi-threaded OpenMP pool can deadlock: fail, never hang
        os.kill(child.pid, signal.SIGKILL)
        pytest.fail("the forked CLI run hung; run the tests with one torch thread")
    return counter.value


def _kill_many(tmp_path: Path, kills: int, seed: int, no_exchange: bool = False) -> None:
    area, ref = tmp_path / "area", tmp_path / "ref"
    out = area / "out"
    assert main(_argv(ref / "old", 0.3)) == 0  # in this process: the forked children start warm
    assert main(_argv(ref / "new", 0.6)) == 0
    old, new = manifest(ref / "old"), manifest(ref / "new")
    assert old and new and old != new
    area.mkdir()
    shutil.copytree(ref / "old", out)
    start = time.perf_counter()
    operations = _run(_argv(out, 0.6), area)  # how many file operations one write takes, and how long
    duration = time.perf_counter() - start
    assert operations > 10 and manifest(out) == new
    rng = random.Random(seed)
    outcomes = set()
    for k in range(kills):
        if manifest(out) != old:  # every kill interrupts a replacement of the old output
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(ref / "old", out)
        if k % 2:
            _run(_argv(out, 0.6), area, delay=rng.uniform(0.0, duration))
        else:
            _run(_argv(out, 0.6), area, kill_at=rng.randint(1, operations))
        if no_exchange:
            recover(out)  # what the next run does first: the old output comes back if it was moved aside
        now = manifest(out)
        assert now in (old, new), f"kill {k}: --out holds neither the old nor the new output: {now}"
        outcomes.add("old" if now == old else "new")
    assert _run(_argv(out, 0.6), area) and manifest(out) == new
    leftovers = sorted(p.name for p in area.iterdir() if p.name != "out")
    assert leftovers == [], f"the next run left staging entries behind: {leftovers}"
    assert outcomes == {"old", "new"}, "the kills never landed on one side of the swap"


def test_sigkill_during_overwrite_leaves_the_old_or_the_new_output_and_no_litter(tmp_path):
    _kill_many(tmp_path, kills=36, seed=0)


@pytest.mark.slow
def test_sigkill_at_many_seeded_points_leaves_the_old_or_the_new_output_and_no_litter(tmp_path):
    _kill_many(tmp_path, kills=200, seed=1)


def test_sigkill_without_atomic_exchange_is_recovered_by_the_next_run(tmp_path):
    """Where renameat2(RENAME_EXCHANGE) is unavailable the old output is moved aside first; a kill
    between the two renames is undone by the next run, which restores it."""
    _kill_many(tmp_path, kills=8, seed=2, no_exchange=True)


def test_staging_entries_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    dead_dir, dead_file = tmp_path / ".out.abc123.tmp", tmp_path / ".out.def456.tmp"
    dead_dir.mkdir()
    (dead_dir / "model.safetensors").write_bytes(b"\0" * 1000)
    dead_file.write_bytes(b"partial")
    live = tmp_path / ".out.live01.tmp"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    sio.fcntl.flock(fd, sio.fcntl.LOCK_EX)  # another process writing the same output right now
    unrelated = tmp_path / ".other.abc.tmp"
    unrelated.mkdir()
    try:
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("a")
        assert sorted(p.name for p in tmp_path.iterdir()) == [".other.abc.tmp", ".out.live01.tmp", "out"]
    finally:
        os.close(fd)


def test_a_killed_overwrite_from_before_the_swap_is_restored(tmp_path):
    """The state a kill between 'move old aside' and 'move new in' leaves: the next run restores."""
    out = tmp_path / "out"
    backup = tmp_path / ".out.old"
    backup.mkdir()
    (backup / "weights").write_text("old")
    with pytest.raises(sio.OutputExistsError):
        sio.refuse_existing(out, overwrite=False)
    assert (out / "weights").read_text() == "old" and not backup.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], ids=oct)
def test_outputs_follow_the_umask_like_any_other_tool(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            from safetensors.torch import save_file

            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
            (tmp / "sub").mkdir()
            with atomic_path(tmp / "sub" / "masks.bin") as f:
                f.write_bytes(b"1")
        with atomic_path(tmp_path / "report.json") as f:
            f.write_text("{}")
    finally:
        os.umask(previous)
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    for path in (tmp_path / "out" / "model.safetensors", tmp_path / "out" / "sub" / "masks.bin",
                 tmp_path / "report.json"):  # fmt: skip
        assert path.stat().st_mode & 0o777 == file_mode, path
    for path in (tmp_path / "out", tmp_path / "out" / "sub"):
        assert path.stat().st_mode & 0o777 == dir_mode, path


def test_an_output_with_nothing_in_it_is_never_committed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(StateError, match="nothing was written"), atomic_dir(out, overwrite=True):
        pass
    assert (out / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
