"""Ranks under ``torchrun``: the launcher's environment read once, the process group made when needed,
barriers with a stated timeout, and the few collectives the stages use. A single process with no launcher
is rank 0 of 1 and every helper here is then a no-op.

The launcher rule (docs/DESIGN.md "Training at scale"): ``torchrun --nproc_per_node W --no-python salfctl
train <stage> ...`` runs a stage with W ranks and the same command without torchrun is the one-rank run.
Each stage splits its work by rank so that a rank's part is a function of the data and the seed, never of
W; only rank 0 writes shared files; ranks meet at barriers.

Timeout: every collective (barriers included) fails after ``SALF_DIST_TIMEOUT_S`` seconds (default 1800,
the gloo default made explicit; NCCL's own default is 10 minutes). A stage never leaves a rank waiting
on a longer piece of work than one shard, one epoch or one lambda of the head's path, so the default is
ample; raise it for very slow storage.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch

DEFAULT_TIMEOUT_S = 1800.0


def timeout_s() -> float:
    """The stated collective timeout (``SALF_DIST_TIMEOUT_S``)."""
    raw = os.environ.get("SALF_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"SALF_DIST_TIMEOUT_S must be a number of seconds, got {raw!r}") from exc
    if value <= 0:
        raise ValueError(f"SALF_DIST_TIMEOUT_S must be > 0, got {raw!r}")
    return value


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
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s()))
            created = True
    return rank, world, created


@contextlib.contextmanager
def process_group():
    """The process group for a whole command: made on entry under torchrun, destroyed on exit (stages inside
    reuse it). Yields ``(rank, world)``."""
    rank, world, created = distributed_context()
    try:
        yield rank, world
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """``(rank, world)`` of the current process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier(world: int | None = None) -> None:
    if (world if world is not None else rank_world()[1]) > 1:
        import torch.distributed as dist

        if torch.cuda.is_available() and dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _comm_device(t: torch.Tensor) -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce(t: torch.Tensor, op_name: str) -> torch.Tensor:
    """``t`` reduced with ``ReduceOp.<op_name>`` over the ranks (a new tensor on ``t``'s device; ``t`` itself
    when there is one rank)."""
    if rank_world()[1] == 1:
        return t
    import torch.distributed as dist

    buf = t.detach().to(_comm_device(t)).clone()
    dist.all_reduce(buf, op=getattr(dist.ReduceOp, op_name))
    return buf.to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over the ranks."""
    return _all_reduce(t, "SUM")


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of ``t`` over the ranks."""
    return _all_reduce(t, "MAX")


def differentiable_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks that autograd sees through (backward: the sum of every rank's gradient)."""
    if rank_world()[1] == 1:
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank."""
    if rank_world()[1] == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
