"""Atomic file writes: a file appears under its name complete, or not at all.

Every writer of the project (models, checkpoints, histories, XSF, ``.nn.ascii``, databases,
plots) writes to a fresh temporary file in the target's folder, flushes it to disk and renames
it over the target with ``os.replace``; on any failure (including ``KeyboardInterrupt``) the
temporary file is removed and whatever was under the name before is untouched. A failed write
(disk full, file size limit) raises ``OSError`` naming the target.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on a normal exit it is synced and
    renamed onto ``path``, on an error removed. The folder must exist. The temporary file gets
    the ordinary permissions of a new file (umask), as ``path`` would have."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the directory {str(path.parent)!r} does not exist")
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        yield temporary
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        unnamed = err.filename is None or Path(err.filename) == temporary
        if err.errno is not None and unnamed:  # an OS error: name the file meant
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        raise
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, newline: str | None = "") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path. ``newline`` as in
    :func:`open` (the default ``""`` writes line endings unchanged)."""
    with (
        replacing(path) as temporary,
        open(temporary, "x", encoding="utf-8", newline=newline) as stream,
    ):
        stream.write(text)
    return Path(path)
