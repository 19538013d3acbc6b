"""`make bench-serving`: 32 concurrent clients mixing every RPC for a bounded time against `salfctl serve`
on the embedded backend and on a real Triton; prints and writes throughput, p50/p99 per RPC and the
failure count. A benchmark, not a test: figures vary with the machine and its load (report ratios
from one run). The model is a small random SALF-CBM exported here (seeded), unless --repository is given.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    a = np.asarray(values) * 1000.0
    return {"count": len(values), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2)}


def run_load(url: str, clients: int, seconds: float, seed: int = 0) -> dict:
    import grpc

    from salf.v1 import gateway_pb2 as pb, gateway_pb2_grpc
    from tests.fixtures.gateway import encode, sample_image

    images = [encode(sample_image(seed + i)) for i in range(8)]
    box = pb.Region(box=pb.Box(x0=10, y0=10, x1=60, y1=50))
    latencies: dict[str, list[float]] = {}
    failures: list[str] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client(k: int):
        rng = np.random.default_rng(seed + k)
        with grpc.insecure_channel(url) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            explanation_id = ""
            while time.monotonic() < end:
                image = images[int(rng.integers(len(images)))]
                kind = ["Predict", "Explain", "ExplainRegion", "Intervene", "GetModelInfo"][int(rng.integers(5))]
                t = time.perf_counter()
                try:
                    if kind == "Predict":
                        stub.Predict(pb.PredictRequest(image=image), timeout=30)
                    elif kind == "Explain":
                        explanation_id = stub.Explain(pb.ExplainRequest(image=image, top_k=3), timeout=30).explanation_id
                    elif kind == "ExplainRegion":
                        stub.ExplainRegion(pb.ExplainRegionRequest(explanation_id=explanation_id, image=image,
                                                                   region=box), timeout=30)
                    elif kind == "Intervene":
                        edit = pb.ConceptEdit(concept_index=0, beta=1.0, region=box)
                        stub.Intervene(pb.InterveneRequest(explanation_id=explanation_id, image=image, edits=[edit]),
                                       timeout=30)
                    else:
                        stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
                    ok = True
                except grpc.RpcError as exc:
                    ok = False
                    with lock:
                        failures.append(f"{kind}: {exc.code().name}: {exc.details()}")
                if ok:
                    with lock:
                        latencies.setdefault(kind, []).append(time.perf_counter() - t)

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    total = sum(len(v) for v in latencies.values())
    return {"clients": clients, "seconds": round(elapsed, 2), "requests": total, "failures": len(failures),
            "failure_examples": failures[:5], "requests_per_s": round(total / elapsed, 1),
            "all": _percentiles([x for v in latencies.values() for x in v]),
            "per_rpc": {k: _percentiles(v) for k, v in sorted(latencies.items())}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--repository", type=Path, default=None, help="an exported repository (default: a random one)")
    ap.add_argument("--backends", default="embedded,triton")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from export.repository import export_repository
    from export.triton_server import TritonServer
    from tests.fixtures.bundles import make_random_bundle
    from tests.fixtures.gateway import start_salfctl_serve

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    try:
        repo = args.repository
        if repo is None:
            repo = work / "model_repository"
            export_repository(make_random_bundle(work / "bundle", seed=0), repo, flavour="python", parity=False)
        results = {}
        for backend in args.backends.split(","):
            triton = TritonServer(repo, log_path=work / "triton.log", poll_secs=0).start() if backend == "triton" else None
            extra = ["--triton", triton.grpc_url] if triton else []
            serve = start_salfctl_serve(repo, work / f"serve-{backend}.log", extra=extra)
            try:
                run_load(serve.url, 2, 2.0)  # warm-up
                results[backend] = run_load(serve.url, args.clients, args.seconds)
            finally:
                serve.stop(grace=10.0)
                if triton:
                    triton.stop()
            r = results[backend]
            print(f"{backend}: {r['requests']} requests in {r['seconds']} s = {r['requests_per_s']}/s, "
                  f"{r['failures']} failed; p50 {r['all'].get('p50_ms')} ms p99 {r['all'].get('p99_ms')} ms; "
                  + ", ".join(f"{k} p50 {v['p50_ms']} p99 {v['p99_ms']}" for k, v in r["per_rpc"].items()))
        doc = {"clients": args.clients, "seconds": args.seconds, "results": results}
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, indent=1) + "\n")
        return 0 if all(r["failures"] == 0 for r in results.values()) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
