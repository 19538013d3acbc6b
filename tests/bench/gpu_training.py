"""The training stages at the paper's shapes on whatever device there is (the "training" section of
`make bench-gpu`; issue 22): ResNet-50 layer4 feature extraction to an fp16 host copy, one CBL step
(2048 -> 4741 at 7x7, the global-batch loss, Adam), one FISTA iteration of the head over fp32 rows
(M = 4741, L = 1000), and, with 2+ ranks under torchrun, the head's [L, M] all_reduce. Each figure is
measured; docs/scale.md's projections assume rates that these replace once a GPU has run them.
"""
from __future__ import annotations

import time

import torch

D, GRID, M, L = 2048, (7, 7), 4741, 1000


def _rate(fn, units: float, repeats: int, sync) -> float:
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return units * repeats / (time.perf_counter() - t)


def training_stages(repeats: int = 5) -> dict:
    import torchvision

    from training.activations import TensorDesign
    from training.head import fit_elastic_net
    from training.losses import distributed_cbl_loss
    from training.model import ConceptBottleneck

    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    batch, rows, cbl_batch = (256, 262_144, 512) if gpu else (4, 4096, 8)
    out = {"device": torch.cuda.get_device_name() if gpu else "cpu", "batch": batch}
    trunk = torch.nn.Sequential(*list(torchvision.models.resnet50(weights=None).children())[:-2]).eval().to(dev)
    x = torch.randn(batch, 3, 224, 224, device=dev)

    def features():
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=gpu):
            trunk(x).float().to("cpu", torch.float16)

    out["features_images_s"] = _rate(features, batch, repeats, sync)
    cbl = ConceptBottleneck(D, M, GRID).to(dev)
    opt = torch.optim.Adam(cbl.parameters(), lr=1e-3)
    f = torch.randn(cbl_batch, D, *GRID, device=dev)
    p = torch.rand(cbl_batch, M, *GRID, device=dev)

    def cbl_step():
        loss = distributed_cbl_loss(cbl(f), p)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out["cbl_rows_s"] = _rate(cbl_step, cbl_batch, repeats, sync)
    out["cbl_batch"] = cbl_batch
    g = torch.Generator(device=dev).manual_seed(0)
    design = TensorDesign(torch.randn(rows, M, device=dev, generator=g),
                          torch.randint(0, L, (rows,), device=dev, generator=g), dev)
    t = time.perf_counter()
    res = fit_elastic_net(design, None, L, 1e-3, 0.99, max_iters=repeats * 4, tol=0.0, device=dev)
    sync()
    out["head_row_iterations_s"] = rows * res.iterations / (time.perf_counter() - t)
    out["head_rows"] = rows
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from training.distributed import all_reduce_sum

        grad = torch.randn(L, M, device=dev)
        out["all_reduce_LxM_ms"] = 1000 / _rate(lambda: all_reduce_sum(grad), 1, repeats, sync)
    else:
        out["all_reduce_LxM_ms"] = None  # one process: needs torchrun with 2+ ranks
    return out
