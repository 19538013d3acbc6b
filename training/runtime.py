"""What every training stage needs from its surroundings, in one place: the device, seeds, progress
bars, and checksummed atomic writes of JSON and tensors (built on ``salf.contract.files``, the
implementation export and serving use too).

Logging is configured once, by ``salfctl``'s root command (``salf/cli.py``); library code only
logs through ``logging.getLogger(__name__)``.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Iterable, TypeVar

import numpy as np
import torch

from salf.contract.files import (ChecksumError, atomic_write_bytes, atomic_write_json, atomic_write_text,
                                 file_record, read_verified, sha256_bytes, sha256_file)

__all__ = ["ChecksumError", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "file_record",
           "load_tensors", "progress", "read_verified", "resolve_device", "save_tensors", "seed_everything",
           "sha256_bytes", "sha256_file"]

T = TypeVar("T")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/``""``/``None`` -> CUDA when available, else CPU; anything else as given. Asking for
    CUDA on a machine without it is a ValueError naming the device (not a failure deep in a stage)."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); returns a CPU generator seeded the same way, for
    data order that must not depend on other random calls."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def progress(items: Iterable[T], desc: str, enabled: bool, unit: str = "it") -> Iterable[T]:
    """``items`` with a tqdm bar on stderr when ``enabled`` (bars vanish when done)."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False, file=sys.stderr)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """Write ``tensors`` as safetensors atomically; returns the file's record ``{"file", "bytes", "sha256"}``
    (check it on read with :func:`load_tensors`)."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)
    return file_record(path, data)


def load_tensors(folder: str | Path, record: dict) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/record["file"]`` after checking its size and SHA-256 against ``record``."""
    from safetensors.torch import load

    return load(read_verified(folder, record))
