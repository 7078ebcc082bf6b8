"""Atomic file writes: a crash never leaves a truncated result, index or checkpoint file behind.

Every writer here fills a hidden temporary file beside the target (`.<name>.<random>.tmp`, same folder, so the same
file system), flushes it to disk and renames it over the target with `os.replace`, which POSIX makes atomic: a
reader sees the previous file or the new one, never a mix. An exception in the middle (a failing serialiser, a full
disk, Ctrl-C) removes the temporary file and leaves the previous target untouched. Only a hard kill (SIGKILL, power
loss) can leave a stray temporary file, and even then never a truncated target.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _create_temporary(path: Path) -> tuple[int, Path]:
    """Open a new hidden file beside `path` for writing.

    `tempfile.mkstemp` would create it with mode 0600; `os.open(..., 0o666)` lets the umask decide, so the final
    file has the permissions of any other file the user creates (a results.json the group can read).
    """
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temporary
        except FileExistsError:  # 48 random bits: practically never, but never overwrite someone else's file
            continue


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (the folder entry), not only the file's bytes.

    Best effort: some file systems (FUSE mounts, Windows) refuse to fsync a folder, and the rename has happened.
    """
    try:
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
    except OSError:
        pass


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(file)` on a temporary binary file beside `path`, then rename it over `path`; return `path`.

    `write` may stream (e.g. `lambda f: torch.save(checkpoint, f)`); if it raises, `path` keeps its previous content
    (or stays absent) and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = _create_temporary(path)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda file: file.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
