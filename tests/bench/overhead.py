"""`make bench-overhead`: what an explanation costs next to a forward pass, at the demo's size and at
the paper's (ResNet-50 layer4, 224 px, M = 4741 concepts, L = 1000 classes, random weights from
`salfctl train random`), and what the gateway holds in memory; part of `make bench-serving`
(tests/bench/report.py), which writes `docs/performance.md`.

Per size, in one run:
- **forward**: a bare onnxruntime run of `salf_cbm` (batch 1) in a process of its own, with the gateway
  idle (two onnxruntime thread pools on two cores would skew each other), against
- Predict, Explain (top-5 PNG heatmaps), ExplainRegion and Intervene (both by explanation id) through
  real gRPC to `salfctl serve` (embedded backend, a process of its own), client-side latency;
- rounds interleave the two sides (forward x n, then each RPC x n) so drift of the machine hits both,
  with a pause between them: onnxruntime's thread pool keeps spinning for a while after its last run,
  and on two cores the other side's forward then runs at half speed;
- the gateway's RSS idle, and after `--explains` Explain requests on distinct images (the explanation
  cache full or at that count).
A benchmark, not a test: figures vary with the machine and its load; compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SIZES = {
    "demo": {"what": "tiny-cpu preset shape, random weights: salf_tinycnn, 112 px, 7x7 grid, 19 concepts, 8 classes",
             "args": ["--config", "tiny-cpu", "--concepts", "19", "--classes", "8"], "image": (112, 112)},
    "paper": {"what": "imagenet-rn50 preset, random weights: ResNet-50 layer4, 224 px, 7x7 grid, 4741 concepts, "
                      "1000 classes, 30 non-zero weights per class",
              "args": ["--config", "imagenet-rn50"], "image": (375, 500)},
}

QUIET_S = 0.5  # pause between the two sides (a measured 2.2x Predict/forward at paper size without it)

# A worker process that runs the bare forward on request: `n` on stdin -> n latencies (s) on stdout.
WORKER = r"""
import sys, json, time, numpy as np, onnxruntime as ort
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
h, w = int(sys.argv[2]), int(sys.argv[3])
x = np.random.default_rng(0).integers(0, 256, (1, h, w, 3), dtype=np.uint8)
sess.run(None, {"image": x})
print("ready", flush=True)
for line in sys.stdin:
    out = []
    for _ in range(int(line)):
        t = time.perf_counter(); sess.run(None, {"image": x}); out.append(time.perf_counter() - t)
    print(json.dumps(out), flush=True)
"""


def _salfctl(*args) -> str:
    exe = str(Path(sys.executable).parent / "salfctl")
    proc = subprocess.run([exe, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout + proc.stderr)
    return proc.stdout


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _p50(values) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, 50))


def measure(size: str, work: Path, rounds: int, per_round: int, explains: int) -> dict:
    from clients.client import SalfClient
    from tests.fixtures.gateway import encode, sample_image, start_salfctl_serve

    cfg = SIZES[size]
    bundle, repo = work / size / "bundle", work / size / "model_repository"
    t = time.perf_counter()
    _salfctl("train", "random", *cfg["args"], "--out", bundle)
    _salfctl("export", bundle, "--out", repo, "--flavour", "python", "--no-parity")
    build_s = time.perf_counter() - t
    meta = json.loads((repo / "salf_model.json").read_text())
    ih, iw = meta["input_size"]
    model = next(repo.glob("salf_cbm/*/model.onnx"))
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(model), str(ih), str(iw)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert worker.stdout.readline().strip() == "ready"
    serve = start_salfctl_serve(repo, work / size / "serve.log")
    h, w = cfg["image"]
    image = encode(sample_image(0, (h, w)), "JPEG")
    box = [w * 0.25, h * 0.25, w * 0.75, h * 0.75]
    times: dict[str, list[float]] = {k: [] for k in ("forward", "Predict", "Explain", "ExplainRegion", "Intervene")}
    fresh = iter([encode(sample_image(5000 + k, (h, w)), "JPEG") for k in range(rounds * per_round)])
    try:
        with SalfClient.connect(serve.url, timeout=120) as c:
            region = c.region(box=box)
            edit = c.edit(region, 1.0, c.info.concepts[0])
            eid = c.explain(image, top_k=5).explanation_id
            for _ in range(3):  # warm-up
                c.predict(image)
                c.explain_region(region, explanation_id=eid)
                c.intervene([edit], explanation_id=eid)
            pb = c.pb
            client_bytes = {
                "Predict": (pb.PredictRequest(image=image, top_k=5).ByteSize(), c.predict(image, top_k=5).ByteSize()),
                "Explain": (c.explain_request(image, top_k=5).ByteSize(), c.explain(image, top_k=5).ByteSize()),
                "ExplainRegion": (pb.ExplainRegionRequest(explanation_id=eid, region=region).ByteSize(),
                                  c.explain_region(region, explanation_id=eid).ByteSize()),
                "Intervene": (pb.InterveneRequest(explanation_id=eid, edits=[edit]).ByteSize(),
                              c.intervene([edit], explanation_id=eid).ByteSize())}
            idle_rss = _rss_mb(serve.process.pid)
            for _ in range(rounds):
                time.sleep(QUIET_S)
                worker.stdin.write(f"{per_round}\n")
                worker.stdin.flush()
                times["forward"].extend(json.loads(worker.stdout.readline()))
                time.sleep(QUIET_S)  # onnxruntime's pool spins a while after its last run: let it stop
                for _ in range(per_round):
                    for name, call in (("Predict", lambda: c.predict(image, top_k=5)),
                                       # a new image each time: ids are content-addressed, so the same image
                                       # again would be a cache hit with no forward pass
                                       ("Explain", lambda: c.explain(next(fresh), top_k=5)),
                                       ("ExplainRegion", lambda: c.explain_region(region, explanation_id=eid)),
                                       ("Intervene", lambda: c.intervene([edit], explanation_id=eid))):
                        t = time.perf_counter()
                        call()
                        times[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            for k in range(explains):  # distinct images: each one a new cache entry
                c.explain(encode(sample_image(1000 + k, (h, w)), "JPEG"), top_k=5, heatmaps="none")
            explains_s = time.perf_counter() - t
            full_rss = _rss_mb(serve.process.pid)
    finally:
        serve.stop()
        worker.stdin.close()
        worker.wait(10)
    p50 = {k: round(_p50(v), 3) for k, v in times.items()}
    f = p50["forward"]
    return {
        "size": size, "model": cfg["what"], "image": f"{w}x{h} JPEG", "build_and_export_s": round(build_s, 1),
        "samples_per_side": rounds * per_round, "p50_ms": p50,
        "ratio_to_forward": {k: round(p50[k] / f, 3) for k in ("Predict", "Explain", "ExplainRegion")},
        "explain_minus_forward_ms": round(p50["Explain"] - f, 3),
        "intervene_cheaper_than_forward_x": round(f / p50["Intervene"], 1),
        "gateway_rss_mb": {"idle": round(idle_rss, 1), f"after_{explains}_explains": round(full_rss, 1)},
        "explains": explains, "explains_per_s": round(explains / explains_s, 1),
        "bytes": {"client": client_bytes, "triton": {dt: triton_bytes(meta, dt) for dt in ("float32", "float16")}},
    }


def triton_bytes(meta: dict, maps_dtype: str) -> dict:
    """Tensor payload bytes (request, response) between the gateway and Triton per RPC, from the
    model's shapes: an image goes in as uint8, the maps come back in ``maps_dtype``, scores and
    logits float32; Intervene sends the maps before and after the edit to salf_head."""
    h, w = meta["input_size"]
    m, cells, classes = len(meta["concepts"]), meta["grid"][0] * meta["grid"][1], len(meta["classes"])
    size = {"float32": 4, "float16": 2}[maps_dtype]
    forward = (h * w * 3, m * cells * size + (m + classes) * 4)
    return {"Predict": forward, "Explain": forward, "ExplainRegion": (0, 0),
            "Intervene": (2 * m * cells * size, 2 * (m + classes) * 4)}


def size_section(r: dict) -> list[str]:
    """docs/performance.md's section of one size (tests/bench/report.py writes the document)."""
    p, q = r["p50_ms"], r["ratio_to_forward"]
    lines = [f"### {r['size']}: {r['model']}", "",
             f"Image {r['image']}, {r['samples_per_side']} samples per side.", "",
             "| call | p50 ms | / forward |", "|---|---:|---:|",
             f"| bare forward (`salf_cbm`, batch 1) | {p['forward']:.2f} | 1.00 |"]
    for k in ("Predict", "Explain", "ExplainRegion"):
        lines.append(f"| {k} | {p[k]:.2f} | {q[k]:.2f} |")
    return lines + [f"| Intervene | {p['Intervene']:.2f} | {p['Intervene'] / p['forward']:.2f} |", "",
                    f"- Explain p50 minus the forward: {r['explain_minus_forward_ms']:.2f} ms",
                    f"- Intervene is {r['intervene_cheaper_than_forward_x']:.1f}x cheaper than a forward",
                    (f"- gateway RSS: {r['gateway_rss_mb']['idle']:.0f} MB idle, "
                     f"{list(r['gateway_rss_mb'].values())[1]:.0f} MB after {r['explains']} Explain requests on "
                     f"distinct images ({r['explains_per_s']} Explain/s, one client, no heatmaps)"), ""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="demo,paper")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--explains", type=int, default=1000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="salf-bench-") as tmp:
        for size in args.sizes.split(","):
            print(f"== {size}", file=sys.stderr)
            results.append(measure(size, Path(tmp), args.rounds, args.per_round, args.explains))
            print("\n".join(size_section(results[-1])))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
