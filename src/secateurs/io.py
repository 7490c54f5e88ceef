"""Safe file output: never clobber without permission, never leave half a file, never lose the old one.

Every output is first written to a *staging* file or directory beside its destination
(``.NAME.XXXX.tmp``), then moved into place in one atomic step:

- a new output is one ``rename``;
- replacing an existing directory (``overwrite=True``) swaps the two in one
  ``renameat2(RENAME_EXCHANGE)`` on Linux, so at every instant ``NAME`` holds either the
  complete old or the complete new output, whatever kills the process. Elsewhere the old
  directory is first renamed to ``.NAME.old`` and the next run restores it if the process
  died between the two renames.

A staging entry is ``flock``-ed by the process writing it. A crashed (even SIGKILLed) run
leaves its staging entry unlocked, and the next write to the same destination deletes it, so
partly written outputs never pile up. Outputs get the permissions the user's umask gives any
new file (``mkdtemp``/``mkstemp`` alone would make them private to the owner).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import SecateursError, StateError

try:
    import fcntl
except ImportError:  # Windows: no flock; stale staging entries are then left alone
    fcntl = None  # type: ignore[assignment]


class OutputExistsError(SecateursError, FileExistsError):
    """The output path exists and overwriting was not allowed."""


_STAGING_SUFFIX = ".tmp"
_RENAME_EXCHANGE = 2  # linux/fs.h
_staging: set[Path] = set()  # staging directories this process is writing now


def _backup(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def refuse_existing(path: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; finish what a crashed earlier write left."""
    path = Path(path)
    recover(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")


def recover(path: str | os.PathLike) -> None:
    """Undo what a killed write to ``path`` left behind: restore the old output if it was moved
    aside and never replaced, and delete staging entries no live process holds."""
    path = Path(path)
    backup = _backup(path)
    if backup.exists() and _unlocked(backup):
        if path.exists() or path.is_symlink():
            _remove(backup)  # the new output was moved into place; only the cleanup was missed
        else:
            os.replace(backup, path)
    with contextlib.suppress(FileNotFoundError):
        for entry in path.parent.glob(f".{_glob_escape(path.name)}.*{_STAGING_SUFFIX}"):
            if _absolute(entry) not in _staging and _unlocked(entry):
                _remove(entry)


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _unlocked(entry: Path) -> bool:
    """True when no process holds ``entry``'s lock (its writer finished or died)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(entry, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # also releases the lock: the entry is removed right after
    return True


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, briefly, for every thread)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _staged(path: Path, directory: bool) -> Iterator[Path]:
    """A locked staging file or directory beside ``path``, with umask permissions; removed on exit
    unless the caller moved it away."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # a file where a folder of the path should be
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), exc.filename) from exc
    while True:  # (earlier crashed writes were recovered by refuse_existing, which every caller runs first)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_STAGING_SUFFIX, dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_STAGING_SUFFIX, dir=path.parent)
            os.close(fd)
            tmp = Path(name)
        lock = os.open(tmp, os.O_RDONLY)
        if _lock(lock, tmp):
            break
        os.close(lock)  # another run's cleanup took it between creation and locking: start afresh
    try:
        _staging.add(_absolute(tmp))
        yield tmp
    finally:
        _staging.discard(_absolute(tmp))
        if tmp.exists():
            _remove(tmp)
        os.close(lock)


def _permissions_from_umask(root: Path) -> None:
    """Give ``root`` and everything in it the mode a plain ``open``/``mkdir`` would: ``mkdtemp``,
    ``mkstemp`` and safetensors create entries private to the owner whatever the umask says."""
    umask = _umask()
    entries = [root, *root.rglob("*")] if root.is_dir() else [root]
    for entry in entries:
        if entry.is_symlink():
            continue
        if entry.is_dir():
            os.chmod(entry, 0o777 & ~umask)
        else:
            executable = entry.stat().st_mode & 0o111
            os.chmod(entry, (0o666 | executable) & ~umask)


def _lock(fd: int, tmp: Path) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    try:  # the entry at ``tmp`` must still be the one we locked
        return os.stat(tmp).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (Linux renameat2); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(tmp: Path, path: Path) -> None:
    if not (path.exists() or path.is_symlink()):
        os.rename(tmp, path)
        return
    if _exchange(tmp, path):
        _remove(tmp)  # now the old output; a kill here leaves it for the next run's cleanup
        return
    backup = _backup(path)
    _remove(backup)
    os.replace(path, backup)  # a kill from here to the next line: recover() restores the backup
    os.replace(tmp, path)
    _remove(backup)


def move_dir_into_place(tmp: str | os.PathLike, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Make the finished directory ``tmp`` (written over a long run, e.g. resumable) ``path`` in one rename
    (an existing ``path`` only with ``overwrite``)."""
    tmp, path = Path(tmp), Path(path)
    refuse_existing(path, overwrite)
    _permissions_from_umask(tmp)
    _replace_dir(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    refuse_existing(path, overwrite)
    with _staged(path, directory=False) as tmp:
        yield tmp
        _permissions_from_umask(tmp)
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it becomes ``path`` only if the block succeeds
    and wrote something. Inside another :func:`atomic_dir`'s staging directory, write in place:
    the outer one already makes the whole output atomic."""
    path = Path(path)
    if _absolute(path) in _staging and overwrite:
        yield path
        return
    refuse_existing(path, overwrite)
    with _staged(path, directory=True) as tmp:
        yield tmp
        if not any(tmp.iterdir()):
            raise StateError(f"nothing was written for {path}; it was left as it was")
        _permissions_from_umask(tmp)
        _replace_dir(tmp, path)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)
