"""Folders and files a user keeps: written whole or not at all, never losing what was there.

A folder is written into a hidden staging sibling ``.NAME.tmp-PID-XXXX`` and then put in place.
Replacing an existing folder swaps the two in one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux,
so at every instant either the old or the new folder is at the target; elsewhere it falls back
to two renames through ``.NAME.old-PID-XXXX``. A crash leaves at most such hidden siblings; the
next write to the same target removes them (or puts an old folder back where the target is
missing) once the process that made them is gone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import UserError

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|probe)-(?P<pid>\d+)-[^/]*")


def check_output(target: str | Path, overwrite: bool = False, what: str = "an adapter") -> Path:
    """Refuse, before any work is done, an output folder that could not be written safely.

    Returns the resolved target. Also clears hidden leftovers of crashed writes to it.

    Raises:
        UserError: the target is the filesystem root, the current folder or one holding it, a
            file, or a non-empty folder (without ``overwrite``; with it, a non-empty folder that
            is not an adapter folder, which softprompt never replaces); or its parent cannot be
            created or written to.
    """
    path = Path(target).expanduser()
    resolved = path.resolve()
    if resolved.parent == resolved:
        raise UserError(f"{path} is the filesystem root; give a folder for {what}")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UserError(
            f"{path} is the current folder or holds it; give a new folder for {what}, "
            "e.g. adapters/NAME"
        )
    if resolved.exists() and not resolved.is_dir():
        raise UserError(f"{path} is a file; give a folder for {what}")
    if resolved.is_dir() and any(resolved.iterdir()):
        if not overwrite:
            raise UserError(
                f"{path} already exists and is not empty; pass --overwrite to replace it"
            )
        if not (resolved / "adapter_config.json").is_file():
            raise UserError(
                f"{path} is not an adapter folder; softprompt replaces only adapter folders, "
                "even with --overwrite: remove it yourself or choose another output"
            )
    try:
        resolved.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(resolved)
        probe = tempfile.mkdtemp(
            prefix=f".{resolved.name}.probe-{os.getpid()}-", dir=resolved.parent
        )
        Path(probe).rmdir()
    except OSError as exc:
        raise UserError(f"cannot write to {path}: {exc.strerror or exc}") from exc
    return resolved


def staging_dir(target: Path) -> Path:
    """A new empty hidden folder beside ``target`` to write it in (named for leftover cleanup)."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))


def sync_folder(folder: Path) -> None:
    """Flush every file in ``folder`` (and below), then the folders themselves, to the disk."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_dir(Path(root))


def sync_dir(folder: Path) -> None:
    """Flush a folder's entries (the names of what was created or renamed in it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def put_in_place(staging: Path, target: Path) -> None:
    """Move the finished ``staging`` folder to ``target``, replacing a folder that is there.

    At every instant the old or the new folder is at ``target`` where the platform can swap two
    paths atomically (Linux); elsewhere there is a moment between two renames, which a later
    :func:`clean_leftovers` repairs if the process dies in it. The new files reach the disk
    before the swap and the swap before this returns, so after a power loss ``target`` holds
    the old folder or the whole new one, and nothing (a checkpoint, the old adapter) is deleted
    before the new one is durable.
    """
    sync_folder(staging)
    try:
        os.rename(staging, target)  # no target, or an empty folder: one atomic rename
        sync_dir(target.parent)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
            raise
    try:
        _exchange(staging, target)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
        os.replace(target, old)  # old is an empty folder, so this replaces it
        os.replace(staging, target)
        sync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    sync_dir(target.parent)
    shutil.rmtree(staging, ignore_errors=True)  # after the swap it holds the old folder


def write_text(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and one rename: never a half-written file."""
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file through a temporary sibling and one rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_dir(path.parent)


def clean_leftovers(target: Path) -> list[Path]:
    """Remove hidden siblings of ``target`` left by writers that died; returns what it handled.

    An ``old`` sibling is put back at ``target`` if ``target`` is missing (the writer died
    between its two renames); anything else from a dead process is deleted.
    """
    handled: list[Path] = []
    if not target.parent.is_dir():
        return handled
    for sibling in sorted(target.parent.iterdir()):
        match = _LEFTOVER.fullmatch(sibling.name)
        if not match or match["name"] != target.name or _alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not target.exists():
            os.rename(sibling, target)
        elif sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        handled.append(sibling)
    return handled


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE)."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "atomic exchange needs Linux")
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "this C library has no renameat2")
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(b))
