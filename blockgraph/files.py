"""Writing output files atomically and leaving nothing behind.

A file is written whole, then given its name in one step (``rename``), so a reader never sees half of it, and a
process killed while writing leaves no temporary file:

* On Linux the data goes into an unnamed file (``O_TMPFILE``), which the kernel deletes when the process dies; once
  written and synced it is linked under a temporary name and renamed over the target at once (a kill between these
  two system calls leaves a named file, removed as below).
* Elsewhere (another system, a file system without ``O_TMPFILE``) it goes into a named ``.blockgraph-*.tmp`` file
  beside the target. A process killed there leaves that file behind, so every write first removes the ones beside
  its target that nobody has written to for :data:`STALE_AFTER_S` seconds (a writer that is alive keeps its file's
  modification time fresh).

An output replaces only a regular file: a directory, a device (``/dev/null``), a FIFO or a socket under the target
name, or behind a symbolic link, is refused. A link to a regular file is followed: the file it points to is replaced.
The new file has the mode of any new file (``0o666`` less the process umask), as the other outputs do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from typing import BinaryIO

from blockgraph.errors import BlockgraphError, Pos

TEMP_PREFIX = ".blockgraph-"
TEMP_SUFFIX = ".tmp"
STALE_AFTER_S = 10 * 60
"""A named temporary file untouched for this long belongs to a writer that died: the next write beside it removes it."""
_STALE_NAME = re.compile(r"\.blockgraph-\w{8,16}\.tmp")
"""A temporary file of ours (``mkstemp``'s 8 characters, in earlier versions, or 16 hex digits)."""
_HINT = "write to a directory you can write to, on a file system with space left"
_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket"}  # fmt: skip
_unnamed_files = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
"""Whether to try unnamed temporary files (Linux); a directory whose file system refuses them falls back to names."""


def output_target(path: str | os.PathLike[str]) -> str:
    """The file that writing ``path`` replaces or creates: ``path`` with symbolic links followed, checked to be a
    regular file or a new name in an existing directory. Call it before a long computation, to fail early.

    Raises:
        BlockgraphError: the path is empty, names a directory, a device, a FIFO or a socket, or its directory does not
            exist.
    """
    shown = os.fspath(path)
    where = Pos(shown or "<output>")
    if not shown:
        raise BlockgraphError(
            "the output path is empty: it names no file", pos=where, hint="name the file to write, e.g. --out model.pt"
        )
    if "\0" in shown:
        raise BlockgraphError(f"cannot write {shown!r}: a path has no NUL character", pos=Pos("<output>"))
    target = os.path.realpath(shown)
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise BlockgraphError(f"cannot write {shown}: {e.strerror}", pos=where, hint=_HINT) from e
    if mode is not None and not stat.S_ISREG(mode):
        kind = file_kind(mode)
        via = f" (a link to {target})" if target != os.path.abspath(shown) else ""
        raise BlockgraphError(
            f"cannot write {shown}: it is {kind}{via}; only a regular file is replaced",
            pos=where,
            hint=f"name a file inside it, e.g. {os.path.join(shown, 'model.pt')}"
            if stat.S_ISDIR(mode)
            else "name a regular file (a new one, or one to replace)",
        )
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise BlockgraphError(
            f"cannot write {shown}: no directory {directory}", pos=where, hint="create the directory first"
        )
    return target


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file to write; when the block ends without an exception it becomes ``path`` (see the module's
    docstring), else it disappears. Nothing else under the target's name changes until then.

    Raises:
        BlockgraphError: the target is not a regular file (:func:`output_target`), or the file cannot be written
            (permissions, a read-only or full file system).
    """
    shown = os.fspath(path)
    target = output_target(shown)
    directory = os.path.dirname(target)
    _remove_stale(directory)
    try:
        fd, name = _open_temporary(directory)
    except OSError as e:
        raise BlockgraphError(
            f"cannot write {shown}: no new file can be made in {directory} ({e.strerror or e})",
            pos=Pos(shown),
            hint=_HINT,
        ) from e
    linked = name
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data on disk before the name: a crash of the machine leaves no torn file
            if linked is None:
                linked = _link(f.fileno(), directory)
        os.replace(linked, target)
    except OSError as e:
        _unlink(linked)
        raise BlockgraphError(f"cannot write {shown}: {e.strerror or e}", pos=Pos(shown), hint=_HINT) from e
    except BaseException:
        _unlink(linked)
        raise


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically (:func:`atomic_output`).

    Raises:
        BlockgraphError: the target is not a regular file, or cannot be written.
    """
    with atomic_output(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def file_kind(mode: int) -> str:
    """What a file of this ``st_mode`` is, in words (``"a FIFO (named pipe)"``)."""
    return "a regular file" if stat.S_ISREG(mode) else _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _temporary_name(directory: str) -> str:
    return os.path.join(directory, f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}")


def _open_temporary(directory: str) -> tuple[int, str | None]:
    """A new file for writing in ``directory``: unnamed (name None) where the system can, else under a new name."""
    flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    if _unnamed_files:
        try:
            return os.open(directory, flags | os.O_TMPFILE, 0o666), None
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    while True:
        name = _temporary_name(directory)
        try:
            return os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o666), name
        except FileExistsError:
            continue


def _link(fd: int, directory: str) -> str:
    """Give the unnamed file ``fd`` a new temporary name in ``directory``: ``linkat(AT_SYMLINK_FOLLOW)`` of its
    ``/proc/self/fd`` link (``os.link`` calls ``linkat``, which follows it, only when given a directory's fd)."""
    folder = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        while True:
            name = _temporary_name(directory)
            try:
                os.link(f"/proc/self/fd/{fd}", os.path.basename(name), dst_dir_fd=folder, follow_symlinks=True)
                return name
            except FileExistsError:
                continue
    finally:
        os.close(folder)


def _unlink(name: str | None) -> None:
    if name is not None:
        with contextlib.suppress(OSError):
            os.unlink(name)


def _remove_stale(directory: str) -> None:
    """Remove the temporary files in ``directory`` that writers killed long ago left (best effort)."""
    remove_stale(directory, _STALE_NAME)


def remove_stale(directory: str, name: re.Pattern[str]) -> None:
    """Remove what killed writers left in ``directory`` long ago (best effort): the regular files and directories
    whose name matches ``name`` and that nobody has written to for :data:`STALE_AFTER_S` seconds (a directory: its
    newest entry)."""
    limit = time.time() - STALE_AFTER_S
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if not name.fullmatch(entry.name):
                continue
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and info.st_mtime < limit:
                    os.unlink(entry.path)
                elif stat.S_ISDIR(info.st_mode):
                    inside = [e.stat(follow_symlinks=False).st_mtime for e in os.scandir(entry.path)]
                    if max([info.st_mtime, *inside]) < limit:
                        shutil.rmtree(entry.path, ignore_errors=True)
