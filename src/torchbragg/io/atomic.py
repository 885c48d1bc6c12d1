"""Files are written whole or not at all: to a temporary name in the same
folder, then renamed over the target."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import IO, Iterator, Union

from ..errors import InputError

PathLike = Union[str, os.PathLike]


def _cannot_write(target: Path, exc: OSError) -> InputError:
    return InputError(f"cannot write {target}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; rename it over ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left as it
    was.  The file gets the usual permissions (0666 less the umask), like a
    plain ``open``.  OS errors become ``InputError`` naming the target.
    """
    if mode not in ("wb", "w"):
        raise ValueError("atomic_open supports modes 'wb' and 'w'")
    target = Path(path)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise _cannot_write(target, exc) from None
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _cannot_write(target, exc) from None
        raise


def atomic_write(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)
