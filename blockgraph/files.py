"""Writing output files atomically: a temporary file in the same directory, renamed into place, so a reader (or a
crash) never sees a half-written file."""

from __future__ import annotations

import os
import tempfile

from blockgraph.errors import BlockgraphError, Pos


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically.

    Raises:
        BlockgraphError: the directory does not exist or cannot be written.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise BlockgraphError(f"cannot write {path}: no directory {directory}", pos=Pos(path))
    payload = data.encode() if isinstance(data, str) else data
    try:
        fd, tmp = tempfile.mkstemp(prefix=".blockgraph-", suffix=".tmp", dir=directory)
    except OSError as e:
        raise BlockgraphError(f"cannot write {path}: {e.strerror}", pos=Pos(path)) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; an output file is an ordinary one
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
