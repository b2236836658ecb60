"""Atomic file writing: write to a temporary file in the same folder, then rename.

Nothing half-written is ever visible under the final name, even after a SIGKILL. The file gets
the permissions an ordinary ``open(path, "w")`` would give it (``0o666`` less the umask), not the
``0o600`` of :func:`tempfile.mkstemp`.

A writer killed mid-write leaves its temporary file behind (``.NAME.<random>.SUFFIX.tmp`` beside
``NAME``). The next write of the same ``NAME`` removes such leftovers — only names of exactly this
pattern, and only those no live writer holds: each writer keeps an exclusive ``flock`` on its
temporary file until the rename, and the lock dies with the process.
:func:`remove_stale_temporaries` does the same for every name in a folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vireid.errors import InputError

#: ``tempfile.mkstemp``'s random part: 8 characters of ``[a-z0-9_]``.
_RANDOM = r"[a-z0-9_]{8}"


def default_cache_dir() -> Path:
    """Where vireid caches rendered datasets and compiled kernels: ``$VIREID_CACHE`` or ``~/.cache/vireid``."""
    return Path(os.environ.get("VIREID_CACHE", Path.home() / ".cache" / "vireid"))


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # not Linux: the classic read (briefly changes the umask)
    os.umask(mask)
    return mask


def _temporary_pattern(final: Path, suffix: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(final.name)}\.{_RANDOM}{re.escape(suffix)}\.tmp$")


def _remove_if_abandoned(path: Path) -> bool:
    """Unlink a temporary file whose writer is gone (no lock held on it); True when removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    try:
        if os.path.samestat(os.fstat(fd), os.lstat(path)):
            os.unlink(path)
            return True
        return False
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> int:
    """Remove the temporary files that killed writers of :func:`atomic_path` left in ``folder``
    (names ``.NAME.<random>.SUFFIX.tmp``, not locked by a live writer). Returns the count."""
    pattern = re.compile(rf"^\..+\.{_RANDOM}(\.[A-Za-z0-9_]+)?\.tmp$")
    removed = 0
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        with os.scandir(folder) as entries:
            for entry in entries:
                if pattern.match(entry.name) and entry.is_file(follow_symlinks=False):
                    removed += _remove_if_abandoned(Path(entry.path))
    return removed


class PendingFile:
    """A temporary file beside ``path`` that :meth:`publish` renames onto it (fsync first); a file
    never published is removed on leaving the ``with`` block. Writers hold an exclusive ``flock``
    on it until then, so no clean-up takes it for a leftover of a killed writer.

    ``suffix`` (default: the suffix of ``path``) matters for writers that append one
    (``np.savez`` adds ``.npz`` to names without it). Leftovers of killed writers of the same name
    are removed first. An unwritable folder or a full disk raises :class:`InputError` naming the path.
    """

    def __init__(self, path: str | os.PathLike[str], suffix: str | None = None, *, clean_stale: bool = True,
                 durable: bool = True) -> None:
        self.final = Path(path)
        self.durable = durable
        suffix = self.final.suffix if suffix is None else suffix
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            if clean_stale:
                pattern = _temporary_pattern(self.final, suffix)
                with os.scandir(self.final.parent) as entries:
                    stale = [entry.path for entry in entries if pattern.match(entry.name)]
                for name in stale:
                    _remove_if_abandoned(Path(name))
            self._fd, tmp_name = tempfile.mkstemp(prefix=f".{self.final.name}.", suffix=suffix + ".tmp",
                                                  dir=self.final.parent)
        except OSError as exc:
            raise InputError(f"{self.final}: cannot write ({_reason(exc)})") from None
        self.tmp = Path(tmp_name)
        self.published = False
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # held until the rename: marks the file as in use
        os.fchmod(self._fd, 0o666 & ~current_umask())

    def sync(self) -> None:
        """fsync the written data now (so that :meth:`publish` is quick)."""
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())

    def publish(self, *, sync_folder: bool = True) -> None:
        try:
            if self.durable:
                self.sync()
            os.replace(self.tmp, self.final)
        except OSError as exc:
            raise _write_error(self.final, exc) from None
        self.published = True
        if sync_folder and self.durable:
            fsync_folder(self.final.parent)

    def __enter__(self) -> PendingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.published:
            with contextlib.suppress(FileNotFoundError):
                self.tmp.unlink()
        os.close(self._fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None, *, sync_folder: bool = True,
                clean_stale: bool = True, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync and rename it onto ``path``
    (:class:`PendingFile`). ``sync_folder=False`` skips the fsync of the folder after the rename,
    for callers that write several files into one folder and sync it once (:func:`fsync_folder`);
    ``clean_stale=False`` skips looking for leftovers of the same name (for folders of many files
    whose owner collects them otherwise); ``durable=False`` skips every fsync (for files that can
    be made again: the rename still never shows a half-written file)."""
    with PendingFile(path, suffix, clean_stale=clean_stale, durable=durable) as pending:
        try:
            yield pending.tmp
        except OSError as exc:
            raise _write_error(pending.final, exc) from None
        pending.publish(sync_folder=sync_folder)


def _write_error(path: Path, exc: OSError) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
        return InputError(f"{path}: cannot write ({_reason(exc)})")
    return exc


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    return exc.strerror or type(exc).__name__


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """fsync a folder, making the renames and creations inside it durable."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, sync_folder: bool = True,
                       clean_stale: bool = True, durable: bool = True) -> None:
    with atomic_path(path, sync_folder=sync_folder, clean_stale=clean_stale, durable=durable) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def save_npz_atomic(path: str | os.PathLike[str], *, sync_folder: bool = True, **arrays: Any) -> None:
    """``np.savez`` (uncompressed) through a temp file + rename."""
    with atomic_path(path, suffix=".npz", sync_folder=sync_folder) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def save_npy_atomic(path: str | os.PathLike[str], array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
