"""Whole-or-nothing file writes: every file the package writes (adapters, ``tuned.json``, tuning results) goes
through ``write_files``.

The caller serializes everything first (bytes), so that an unserializable value fails before the disk changes.
Each file is then written to a temporary file in its own folder (same file system), flushed to disk, and moved
over its name with ``os.replace``: a reader sees the old file or the new one, never a part. A name that is a
symbolic link is replaced by the new file, never written through into the link's target.

Several files (an adapter's weights and config) cannot be replaced in one step. Each old file is kept under a
hard link until all are in place; if a later move fails, the earlier ones are moved back, so the folder holds the
old set or the new one. (Where hard links are unavailable, the old file is copied aside instead.)
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Mapping


def _temporary_name(path: str, kind: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{secrets.token_hex(6)}.{kind}")


def _write_temporary(path: str, data: bytes) -> str:
    """``data`` in a new file next to ``path`` (created with the mode a plain open would give it), on disk."""
    temporary = _temporary_name(path, "tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove(temporary)
        raise
    return temporary


def _keep_old(path: str) -> str | None:
    """A second name for the file now at ``path`` (None if there is none), to move back on a failure."""
    if not os.path.lexists(path):
        return None
    kept = _temporary_name(path, "old")
    try:
        os.link(path, kept, follow_symlinks=False)
    except (OSError, NotImplementedError):  # no hard links here (FAT, some network file systems, some platforms)
        if os.path.islink(path):
            os.symlink(os.readlink(path), kept)
        else:
            shutil.copy2(path, kept)
    return kept


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _sync_folder(folder: str) -> None:
    """Make the renames durable (POSIX); folders cannot be opened for this on Windows."""
    try:
        descriptor = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_files(files: Mapping[str | os.PathLike, bytes]) -> None:
    """Write each ``{path: bytes}``, all or none: on any failure every path holds what it held before."""
    files = {os.fspath(path): data for path, data in files.items()}
    for path, data in files.items():
        if not isinstance(data, bytes):
            raise TypeError(f"write_files: the content for {path!r} must be bytes, got {type(data).__name__}")
    temporaries, kept, moved = {}, {}, []
    try:
        for path, data in files.items():
            temporaries[path] = _write_temporary(path, data)
        for path in files:
            kept[path] = _keep_old(path)
        for path, temporary in temporaries.items():
            os.replace(temporary, path)
            moved.append(path)
    except BaseException:
        for path in reversed(moved):  # put the old files back (or remove the new file where there was none)
            if kept[path] is None:
                _remove(path)
            else:
                os.replace(kept.pop(path), path)
        raise
    finally:
        for name in [*temporaries.values(), *(k for k in kept.values() if k is not None)]:
            _remove(name)
        for folder in {os.path.dirname(path) for path in moved}:
            _sync_folder(folder)


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Write one file whole or not at all (see ``write_files``)."""
    write_files({path: data})
