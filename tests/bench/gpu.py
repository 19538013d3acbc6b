"""`make bench-gpu`: the one prepared script for a lent GPU (issue 12, section 5); it also runs on a CPU
(slowly, smaller batches) so that it is known to work before the GPU minutes are spent.

In one run, on the paper's size with random weights (`salfctl train random --config imagenet-rn50`):
1. the full SALF-CBM in PyTorch (ResNet-50 layer4 + CBL with M = 4741 + head, bf16 autocast) against
   the plain torchvision ResNet-50 classifier, same batch, same input, interleaved: images/s of each
   and the ratio (target >= 0.87);
2. the exported `salf_cbm` graph through onnxruntime with the CUDA execution provider (CPU when there
   is none) at batch 1 and at `--batch`;
3. `salfctl serve --device cuda` (the embedded backend on the CUDA provider): Predict and Explain p50
   through real gRPC next to that bare forward;
4. the training stages at the paper's shapes (tests/bench/gpu_training.py): feature extraction, a CBL
   step, a head FISTA iteration, and the head's all_reduce under torchrun.
Prints a JSON document and writes it with --json. On a CPU (no bf16 units) the torch comparison runs in
float32 at batch 4. onnxruntime-gpu here is built for CUDA 13 and cuDNN 9: on the GPU machine their
pip wheels (nvidia-cublas, nvidia-cudnn, ...) or system libraries must be loadable, or the CUDA provider
falls back to the CPU, which the JSON's "providers" entries show.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.bench.common import paper_repository


def _images_per_s(fn, batch: int, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return batch / float(np.median(times))


def torch_models(bundle: Path, batch: int, repeats: int) -> dict:
    import torch
    import torchvision

    from training.bundle import load_bundle

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model, _ = load_bundle(bundle)
    model = model.eval().to(device)
    plain = torchvision.models.resnet50(weights=None).eval().to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    out = {"device": device, "dtype": "bfloat16" if device == "cuda" else "float32", "batch": batch,
           "salf_cbm": [], "resnet50": []}
    # bf16 where the hardware has it (the GPU); a CPU without bf16 units runs it ~30x slower, so float32 there
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for _ in range(3):  # interleaved rounds
            out["salf_cbm"].append(_images_per_s(lambda: model(x), batch, repeats, sync))
            out["resnet50"].append(_images_per_s(lambda: plain(x), batch, repeats, sync))
    for k in ("salf_cbm", "resnet50"):
        out[k] = round(float(np.median(out[k])), 1)
    out["ratio"] = round(out["salf_cbm"] / out["resnet50"], 3)
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def onnx_forward(repo: Path, batch: int, repeats: int) -> dict:
    import onnxruntime as ort

    model = next(repo.glob("salf_cbm/*/model.onnx"))
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    sess = ort.InferenceSession(str(model), providers=providers)
    rng = np.random.default_rng(0)
    out = {"providers": sess.get_providers()}
    for b in sorted({1, batch}):
        x = rng.integers(0, 256, (b, 224, 224, 3), dtype=np.uint8)
        ips = _images_per_s(lambda: sess.run(None, {"image": x}), b, repeats, lambda: None)
        out[f"batch_{b}"] = {"images_per_s": round(ips, 1), "ms": round(1000.0 * b / ips, 2)}
    return out


def gateway(repo: Path, work: Path, samples: int) -> dict:
    from clients.client import SalfClient
    from tests.fixtures.gateway import encode, sample_image, start_salfctl_serve

    serve = start_salfctl_serve(repo, work / "serve.log", extra=["--device", "cuda"])
    image = encode(sample_image(0, (375, 500)), "JPEG")
    try:
        with SalfClient.connect(serve.url, timeout=120) as c:
            times: dict[str, list[float]] = {"Predict": [], "Explain": []}
            for _ in range(3):
                c.predict(image)
                c.explain(image, top_k=5)
            for _ in range(samples):
                for name, call in (("Predict", lambda: c.predict(image)), ("Explain", lambda: c.explain(image, top_k=5))):
                    t = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - t)
    finally:
        serve.stop()
    log = (work / "serve.log").read_text()
    providers = next((line.split("providers", 1)[1].strip() for line in log.splitlines()
                      if "embedded backend:" in line), "")
    return {"providers": providers, **{k: round(1000 * float(np.median(v)), 2) for k, v in times.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=None, help="default: 256 on a GPU, 4 on a CPU")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    batch = args.batch or (256 if torch.cuda.is_available() else 4)
    repeats = args.repeats if torch.cuda.is_available() else min(args.repeats, 2)
    doc: dict = {}
    with tempfile.TemporaryDirectory(prefix="salf-gpu-") as tmp:
        work = Path(tmp)
        paper_repository(work, "--flavour", "onnxruntime", "--instance-kind",
                         "gpu" if torch.cuda.is_available() else "cpu", name="repo")
        doc["torch_bf16"] = torch_models(work / "bundle", batch, repeats)
        print(json.dumps(doc["torch_bf16"]), flush=True)
        doc["onnxruntime"] = onnx_forward(work / "repo", batch, repeats)
        print(json.dumps(doc["onnxruntime"]), flush=True)
        doc["gateway_device_cuda"] = gateway(work / "repo", work, args.samples)
        print(json.dumps(doc["gateway_device_cuda"]), flush=True)
    from tests.bench.gpu_training import training_stages

    doc["training"] = training_stages(repeats)
    print(json.dumps(doc["training"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
