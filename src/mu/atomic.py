"""Atomic writes: every file and directory mu writes appears whole or not at all.

Each writer fills a temporary sibling of the target (same folder, so the rename stays on one file
system), flushes it to disk (fsync), renames it over the target and syncs the folder. A crash, a
signal or a full disk at any point leaves the previous target intact and no temporary file behind
that a later run could mistake for a result.

    atomic_write_text(path, text)         atomic_write_json(path, obj)      atomic_write_bytes(path, data)
    with atomic_file(path) as tmp: fig.savefig(tmp)          # any writer that takes a path
    with atomic_directory(path) as tmp: (tmp / "a.txt").write_text("...")
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from mu.errors import MuError


def _prepare(path: Path) -> None:
    """Refuse a directory as a file target; create the parent folder, or say what is in its way."""
    if path.is_dir():
        raise MuError(f"{path}: is a directory; expected a file name to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise MuError(f"{path}: cannot create the folder {path.parent} (a file of that name is in the way)") from None


def _fsync_path(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk; folders cannot be opened for sync everywhere (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` for any writer to fill; on success it replaces `path`."""
    path = Path(path)
    _prepare(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text: readers see the old file or the new one, never a part."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2, **dumps: Any) -> Path:
    """`obj` as indented JSON (non-ASCII kept as is) plus a final newline; `dumps` go to `json.dumps`."""
    dumps.setdefault("ensure_ascii", False)
    return atomic_write_text(path, json.dumps(obj, indent=indent, **dumps) + "\n")


@contextmanager
def atomic_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `directory` to fill; on success it replaces `directory`.

    An old `directory` is moved aside and removed only after the rename, and a failure removes the
    temporary one, so a crash never leaves a half-written directory.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            _fsync_path(f)
        _fsync_path(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(directory.parent)
