"""Atomic writes and SHA-256 checksums: the one implementation every part uses.

A reader (or a kill at any point) sees either the old file or the whole new one: data goes to a
temporary name in the same folder, is flushed and fsynced, then renamed over the target, and the
folder is fsynced so the rename survives a crash.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CHUNK = 1 << 22


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, the file written
    there replaces ``path`` atomically (for writers that want a file name, e.g. safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, doc, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """JSON (no NaN: ``allow_nan=False``) with a final newline, written atomically."""
    return atomic_write_text(path, json.dumps(doc, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class ChecksumError(OSError):
    """A file is missing, truncated or corrupted: its size or SHA-256 differs from its record."""


def file_record(path: str | Path, data: bytes) -> dict:
    """``{"file", "bytes", "sha256"}`` of ``data`` written at ``path`` (what :func:`read_verified` checks)."""
    return {"file": Path(path).name, "bytes": len(data), "sha256": sha256_bytes(data)}


def read_verified(folder: str | Path, record: dict) -> bytes:
    """The bytes of ``folder/record["file"]``; :class:`ChecksumError` when they do not match the record."""
    path = Path(folder) / record["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ChecksumError(f"{path} is missing") from exc
    if len(data) != record.get("bytes") or sha256_bytes(data) != record.get("sha256"):
        raise ChecksumError(f"{path} is truncated or corrupted (size/checksum mismatch with its record)")
    return data
