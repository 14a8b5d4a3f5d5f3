"""Atomic file writes: write under a temporary name in the same directory, rename into place when complete.

A crash or an exception never leaves a partial file at the destination, and
the temporary file is removed. The temporary name is ``.NAME.tmp-XXXXXXXX``
beside ``NAME`` (:func:`is_temp_name` recognises one a killed process left).
A finished file gets the permissions a plain ``open()`` would give it (the
process's umask), not the owner-only ones of a temporary file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

#: what marks a temporary name: ``.NAME.tmp-XXXXXXXX``
TEMP_MARK = ".tmp-"


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


#: permissions of a finished file: what ``open(path, "w")`` makes under this process's umask
_FILE_MODE = _file_mode()


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is the temporary file of an unfinished atomic write (``.NAME.tmp-XXXX``, or the
    ``.NAME.XXXX.tmp`` that earlier versions wrote)."""
    return name.startswith(".") and (TEMP_MARK in name or name.endswith(".tmp"))


class PendingFile:
    """A temporary file beside ``path`` (its name in :attr:`tmp`) that becomes ``path`` only through
    :meth:`commit` (fsynced, then renamed onto it); :meth:`discard` deletes it. For writers whose output
    is finished by a later call than the one that starts it (:class:`echo_stream.media.Mp4Writer`);
    otherwise use :func:`atomic_path`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}{TEMP_MARK}", dir=self.path.parent)
        os.close(fd)

    def commit(self) -> None:
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(self.tmp, _FILE_MODE)
        os.replace(self.tmp, self.path)
        self.tmp = None

    def discard(self) -> None:
        tmp, self.tmp = self.tmp, None
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    pending = PendingFile(path)
    try:
        yield pending.tmp
        pending.commit()
    except BaseException:
        pending.discard()
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_parquet(table, path: str | os.PathLike, compression: str = "zstd") -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=compression)


def output_dir(path: str | os.PathLike, flag: str = "--out") -> str:
    """Create directory ``path`` for a command's results before its work starts (not after it); an
    :class:`~echo_stream.errors.InputError` naming ``flag`` when it cannot be created or written."""
    from .errors import InputError

    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise InputError(flag, f"{path}: cannot write there ({e.strerror or e})") from None
    if not os.access(path, os.W_OK):
        raise InputError(flag, f"{path}: cannot write there (no write permission)")
    return str(path)
