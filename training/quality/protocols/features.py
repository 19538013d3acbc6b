"""The features every protocol starts from: one pass of the model over a split (pooled backbone features,
standardised concept scores, logits, labels), and the train split's standardisation of them.

At scale (:func:`dataset_features`): images are read by a torch DataLoader, batches run on the model's
device, and the outputs are written into tensors preallocated at their final size, so memory is the
outputs plus one batch. Under ``torchrun`` each rank computes its share of the items and every rank
ends with all of them, in order."""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from training.model import normalize_uint8, pooled_features

from .localisation import sample

log = logging.getLogger(__name__)

REDUCE_CHUNK_BYTES = 64 << 20  # the all_reduce works on slices this large (NCCL: copied to the GPU and back)


@torch.no_grad()
def dataset_features(model, dataset, batch_size: int = 64, limit: int | None = None, *, seed: int = 0,
                     indices: Sequence[int] | None = None, num_workers: int = 0):
    """Pooled backbone features ``[N, D]``, the model's standardised concept scores ``[N, M]``, logits
    ``[N, K]`` (on the CPU) and int64 labels ``[N]`` over items of ``dataset``.

    Items: ``indices`` (in that order), else a seeded draw of ``limit`` of them (:func:`.localisation.sample`,
    the draw ``--limit`` makes of the test split: ``limit`` distinct indices from ``seed``, in index order,
    so a limit does not pick only the first classes of a class-sorted split), else every item.

    Batches run where the model is (``next(model.parameters()).device``): uint8 images are read by a
    DataLoader (``num_workers`` decoding processes, pinned memory on CUDA), moved with ``non_blocking`` and
    normalised there; each batch's outputs come back to the CPU into tensors allocated once at their final
    size (no per-batch list and concatenation, which would hold the outputs twice).

    Under ``torchrun`` (``training.distributed.distributed_context``; a process group is made if none
    exists and destroyed on return), rank ``r`` of ``W`` computes the items at positions ``p`` with
    ``p % W == r`` (batches of ``batch_size`` of its own items), writes them into zero-filled full-size
    tensors, and the ranks sum those tensors in place (``all_reduce``, in slices): every rank returns every
    item, in order. All-reduce rather than all-gather: it works in place on the final tensors (an
    all-gather of per-rank blocks needs another full copy to receive them before interleaving), and it is
    exact, because each row is non-zero on its owner only and ``x + 0 == x`` in any summation order (a
    ``-0.0`` becomes ``+0.0``). A rank's values can still differ from one process's in the last bits: its
    batches hold other images, and kernels are not guaranteed batch-invariant. One process batches
    consecutive items from the first, as before.
    """
    from training.distributed import distributed_context

    if indices is not None and limit is not None:
        raise ValueError("give indices or limit, not both")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chosen = [int(i) for i in indices] if indices is not None else sample(dataset, limit, seed)
    n = len(chosen)
    spec = model.backbone.spec
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    pooled = torch.zeros(n, model.cbl.conv.in_channels, dtype=dtype)
    scores = torch.zeros(n, model.cbl.conv.out_channels, dtype=dtype)
    logits = torch.zeros(n, model.head.linear.out_features, dtype=dtype)
    labels = torch.zeros(n, dtype=torch.int64)
    rank, world, created = distributed_context()
    try:
        mine = list(range(rank, n, world))  # positions in ``chosen``
        batches = [mine[s:s + batch_size] for s in range(0, len(mine), batch_size)]
        log.debug("dataset features: rank %d/%d, %d of %d items on %s", rank, world, len(mine), n, device)
        if batches:
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=[[chosen[p] for p in b] for b in batches],
                                                 num_workers=num_workers, pin_memory=device.type == "cuda")
            for positions, (images, ys) in zip(batches, loader):
                x = normalize_uint8(images.to(device, non_blocking=True), spec.mean, spec.std)
                feats = model.backbone(x)
                s, lg = model.head(model.cbl(feats))
                rows = torch.as_tensor(positions)
                pooled[rows] = pooled_features(feats, model.grid).cpu()
                scores[rows] = s.cpu()
                logits[rows] = lg.cpu()
                labels[rows] = torch.as_tensor(ys, dtype=torch.int64)
        if world > 1:
            for t in (pooled, scores, logits, labels):
                _sum_over_ranks(t)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    return pooled, scores, logits, labels


def _sum_over_ranks(t: torch.Tensor, chunk_bytes: int = REDUCE_CHUNK_BYTES) -> None:
    """``t`` (contiguous, on the CPU) summed over the ranks in place, slice by slice: gloo reduces CPU
    tensors directly; NCCL only GPU ones, so each slice goes to the current GPU and back."""
    import torch.distributed as dist

    flat = t.view(-1)
    step = max(1, chunk_bytes // t.element_size())
    on_gpu = dist.get_backend() == "nccl"
    for start in range(0, flat.numel(), step):
        part = flat[start:start + step]
        if on_gpu:
            buf = part.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(buf)
            part.copy_(buf)
        else:
            dist.all_reduce(part)


def standardised(train: torch.Tensor, *others: torch.Tensor):
    from training.head import standardisation

    mean, std = standardisation(train)
    return mean, std, [(x - mean) / std for x in (train, *others)]
