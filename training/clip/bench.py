"""`make bench-similarity`: images/s of the similarity stage vs a naive Algorithm-1 loop, in one run.

Naive (paper appendix A.1, as usually written): per image, 49 Pillow copies with a red circle each,
converted and normalised on the host, encoded as one fp32 batch of 49. Ours: one decode per image,
rings drawn on the device from a cached stencil, large batches, bf16 autocast (and optionally
``torch.compile``) on a GPU, fp32 on a CPU; for ViT towers run eagerly, only the patches a ring
touches are re-embedded (``patch_reuse.py``). Both read the same files and produce embeddings of the
same prompts; the benchmark also reports their largest difference.

FLOPs are counted on the model actually used (``torch.utils.flop_counter``, 2 FLOPs per multiply-add,
the convention of the 35.1 GFLOP/prompt figure for ViT-B/16 at 224).

    python -m training.clip.bench --clip salf-tiny-clip-112 --images 16            # CPU, tiny model
    python -m training.clip.bench --clip ViT-B-16 --images 512 --compile --device cuda   # GPU
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from salf.contract.grid import grid_points
from salf.contract.images import load_image

from .encode import ClipEncoder, load_clip
from .prompts import draw_circle_pil
from .similarities import PromptEmbedder, default_workers, image_batches

log = logging.getLogger(__name__)


@torch.no_grad()
def naive_prompt_embeddings(paths: Sequence[str | Path], encoder: ClipEncoder, grid: tuple[int, int],
                            radius: int, placement: str = "stride") -> torch.Tensor:
    """Algorithm 1 verbatim: float32 ``[N, G, D]`` (fp32, one batch of G Pillow-drawn prompts per image), the
    circles at ``placement``'s centres (salf.contract.grid)."""
    from PIL import Image

    h, w = encoder.image_size
    centres = grid_points((h, w), grid, placement)
    mean = torch.tensor(encoder.mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std).view(1, 3, 1, 1)
    out = []
    for path in paths:
        image = Image.fromarray(load_image(path, (h, w)))
        prompts = [np.asarray(draw_circle_pil(image, c, radius)) for c in centres]
        x = torch.from_numpy(np.stack(prompts)).permute(0, 3, 1, 2).to(torch.float32)
        x = ((x / 255.0 - mean) / std).to(encoder.device)
        feats = encoder.model.encode_image(x).float()
        out.append(torch.nn.functional.normalize(feats, dim=-1).cpu())
    return torch.stack(out)


def flops_per_prompt(encoder: ClipEncoder) -> float:
    """FLOPs of one image-encoder forward at the model's input size (2 per multiply-add).

    Counted with nn.MultiheadAttention's fused fast path off and the math attention kernel, whose ops the
    counter knows (the fused kernels would hide the attention projections): ViT-B/16 at 224 -> 35.13 GFLOP.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, *encoder.image_size, device=encoder.device)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            encoder.model.encode_image(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return float(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fast_pass(paths, encoder: ClipEncoder, grid, radius, batch_size: int, embedder: PromptEmbedder,
               workers: int) -> torch.Tensor:
    per_batch = max(1, batch_size // (grid[0] * grid[1]))
    batches = [list(range(s, min(s + per_batch, len(paths)))) for s in range(0, len(paths), per_batch)]
    parts = [embedder.encode(images, to_cpu=False) for images in
             image_batches(paths, encoder.image_size, batches, workers, encoder.device.type == "cuda")]
    return torch.cat(parts).cpu()


def write_bench_images(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """``count`` smooth random PNG images (JPEG-like content cost is not the point: decoding is identical)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        low = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size[1], size[0]), Image.BICUBIC)
        path = root / f"img{i:05d}.png"
        img.save(path)
        paths.append(path)
    return paths


def run_bench(clip: str, pretrained: str | None, images: int, grid: tuple[int, int], radius: int | None,
              batch_size: int | None, device: str, precision: str, compile: bool, data: str | None,
              naive_images: int | None, repeats: int) -> dict:
    """Time both implementations on the same images; ``radius`` None: 32 scaled to the CLIP input size,
    ``batch_size`` None: 980 prompts on a GPU, 245 on a CPU."""
    encoder = load_clip(clip, pretrained, device=device, precision=precision)
    if radius is None:
        radius = max(2, round(32 * encoder.image_size[0] / 224))
    if batch_size is None:
        batch_size = 980 if encoder.device.type == "cuda" else 245
    with tempfile.TemporaryDirectory() as tmp:
        if data:
            paths = sorted(p for p in Path(data).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
            paths = paths[:images]
        else:
            paths = write_bench_images(Path(tmp), images, encoder.image_size)
        if not paths:
            raise ValueError(f"no images found under {data}")
        n_naive = min(len(paths), naive_images or len(paths))
        workers = default_workers(encoder.device)
        embedder = PromptEmbedder(encoder, grid, radius, compile=compile)
        # Warm-up: compiles, allocator, first-touch; not timed.
        _fast_pass(paths[:max(1, batch_size // (grid[0] * grid[1]))], encoder, grid, radius, batch_size,
                   embedder, workers)
        naive_prompt_embeddings(paths[:1], encoder, grid, radius)
        fast_t, naive_t = [], []
        for _ in range(repeats):
            _sync(encoder.device)
            t0 = time.perf_counter()
            fast = _fast_pass(paths, encoder, grid, radius, batch_size, embedder, workers)
            _sync(encoder.device)
            fast_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            naive = naive_prompt_embeddings(paths[:n_naive], encoder, grid, radius)
            _sync(encoder.device)
            naive_t.append(time.perf_counter() - t0)
    g = grid[0] * grid[1]
    fast_rate, naive_rate = len(paths) / min(fast_t), n_naive / min(naive_t)
    flops = flops_per_prompt(encoder)
    return {
        "device": str(encoder.device) if encoder.device.type == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(), "model": clip, "image_size": list(encoder.image_size),
        "grid": list(grid), "radius": radius, "precision": encoder.precision, "compile": compile,
        "prompt_path": embedder.path,
        "batch_size_prompts": batch_size, "images": len(paths), "naive_images": n_naive,
        "fast_images_per_s": fast_rate, "naive_images_per_s": naive_rate, "ratio": fast_rate / naive_rate,
        "gflop_per_prompt": flops / 1e9,
        "fast_tflops": fast_rate * g * flops / 1e12, "naive_tflops": naive_rate * g * flops / 1e12,
        "max_abs_diff_vs_naive": float((fast[:n_naive].float() - naive).abs().max()),
        # Every repeat's seconds: on a shared machine the spread shows how far to trust the ratio (of minima).
        "fast_times_s": [round(t, 4) for t in fast_t], "naive_times_s": [round(t, 4) for t in naive_t],
        "median_ratio": (len(paths) / n_naive) * float(np.median(naive_t) / np.median(fast_t)),
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", default="salf-tiny-clip-112", help="open_clip model name")
    ap.add_argument("--clip-pretrained", default=None, help="local weights file or cached tag (default: random)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--naive-images", type=int, default=None, help="time the naive loop on fewer images")
    ap.add_argument("--data", default=None, help="folder of images (default: generated PNGs)")
    ap.add_argument("--grid", default="7x7")
    ap.add_argument("--radius", type=int, default=None, help="default: 32 scaled to the input size")
    ap.add_argument("--batch-size", type=int, default=None, help="prompts per forward (default 980 GPU / 245 CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the image encoder")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    from salf.cli import configure_logging

    configure_logging(-1)
    grid = tuple(int(v) for v in args.grid.lower().split("x"))
    res = run_bench(args.clip, args.clip_pretrained, args.images, grid, args.radius, args.batch_size, args.device,
                    args.precision, args.compile, args.data, args.naive_images, args.repeats)
    text = json.dumps(res, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    # A command-line report: stdout is its interface.
    print(text)
    print(f"similarity stage: {res['fast_images_per_s']:.2f} images/s vs naive {res['naive_images_per_s']:.2f} "
          f"images/s -> ratio {res['ratio']:.2f}x; {res['fast_tflops']:.4f} TFLOP/s achieved "
          f"({res['gflop_per_prompt']:.3f} GFLOP/prompt, {res['device']}, {res['precision']})")


if __name__ == "__main__":
    main()
