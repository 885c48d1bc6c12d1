"""Files are written whole or not at all: to a temporary name in the same
folder, then renamed over the target.

A symlink is followed (its target is replaced, the link kept) and a target
that is not a regular file (a character device such as /dev/null, a pipe)
is written straight through: renaming over it would replace the device node.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import IO, Iterator, Union

from ..errors import InputError

PathLike = Union[str, os.PathLike]


def _cannot_write(target: PathLike, exc: OSError) -> InputError:
    return InputError(f"cannot write {target}: {exc.strerror or exc}")


def _target(path: PathLike) -> Path:
    text = os.fspath(path)
    if text == "":
        raise OSError(errno.ENOENT, "empty file name")
    if text.endswith(("/", os.sep)):
        raise OSError(errno.EISDIR, "the name ends in a folder separator")
    return Path(os.path.realpath(text))


@contextlib.contextmanager
def raw_atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Like ``atomic_open`` but failures stay ``OSError`` (for optional files)."""
    if mode not in ("wb", "w"):
        raise ValueError("atomic_open supports modes 'wb' and 'w'")
    target = _target(path)
    if target.exists() and not target.is_file() and not target.is_dir():
        with open(target, mode) as fh:  # a device or pipe: no temporary, no rename
            yield fh
        return
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; rename it over ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left as it
    was.  The file gets the usual permissions (0666 less the umask), like a
    plain ``open``.  OS errors become ``InputError`` naming the target.
    """
    try:
        with raw_atomic_open(path, mode) as fh:
            yield fh
    except OSError as exc:
        raise _cannot_write(path, exc) from None


def atomic_write(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)
