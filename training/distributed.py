"""Ranks under ``torchrun``: the launcher's environment read once, the process group made when needed,
barriers. A single process with no launcher is rank 0 of 1."""
from __future__ import annotations

import os

import torch


def distributed_context() -> tuple[int, int, bool]:
    """``(rank, world_size, initialised_here)`` from torchrun's environment; (0, 1, False) without a launcher."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad RANK/WORLD_SIZE in the environment: {rank}/{world}")
    created = False
    if world > 1:
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend)
            created = True
    return rank, world, created


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if torch.cuda.is_available() and dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()
