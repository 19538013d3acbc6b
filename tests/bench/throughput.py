"""`make bench-throughput`: the gateway in front of Triton against Triton's own load generator
(`perf_analyzer` from tritonclient 2.46, `make perf-analyzer`) driven straight at Triton, at the
same concurrencies, at the paper's size (random weights, `salfctl train random`) unless --repository.

Per concurrency c (1, 8, 32 by default), interleaved in one run:
- perf_analyzer -m salf_cbm -i grpc --concurrency-range c: images/s, p50/p99 latency (its own timers);
- c client threads (this process) calling Predict on `salfctl serve --triton` (its own process) with a
  224x224 PNG for a fixed time: images/s, p50/p99 client-side;
- the same gateway on one Stream call with a window of c (what `salfctl predict DIR` sends);
- the embedded gateway (`salfctl serve` without Triton) with c clients, Triton idle;
- Triton's mean executed batch on each side (nv_inference_count / nv_inference_exec_count deltas).
Prints the table and writes JSON with --json; `make bench-serving` (tests/bench/report.py) puts it in
docs/performance.md. A benchmark, not a test: compare ratios of one run.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from tests.bench.common import paper_repository


def _counters(metrics_url: str, model: str = "salf_cbm") -> tuple[float, float]:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    count = execs = 0.0
    for line in text.splitlines():
        if f'model="{model}"' not in line:
            continue
        if line.startswith("nv_inference_count{"):
            count += float(line.rsplit(" ", 1)[1])
        elif line.startswith("nv_inference_exec_count{"):
            execs += float(line.rsplit(" ", 1)[1])
    return count, execs


def _mean_batch(before, after) -> float:
    d_count, d_exec = after[0] - before[0], after[1] - before[1]
    return round(d_count / d_exec, 2) if d_exec else float("nan")


def perf_analyzer(binary: Path, grpc_url: str, concurrency: int, interval_ms: int, work: Path) -> dict:
    out = work / f"pa-{concurrency}.csv"
    lib = next(binary.parent.parent.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"), None)
    env = {**os.environ, "LD_LIBRARY_PATH": f"{lib}:{os.environ.get('LD_LIBRARY_PATH', '')}" if lib else ""}
    cmd = [str(binary), "-m", "salf_cbm", "-i", "grpc", "-u", grpc_url, "--concurrency-range", str(concurrency),
           "--measurement-interval", str(interval_ms), "--percentile", "99", "--input-data", "random",
           "--max-trials", "6", "-s", "100", "-f", str(out)]  # -s 100: a noisy 2-core box; take the measurement
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    row = next(csv.DictReader(out.open()))
    return {"images_per_s": round(float(row["Inferences/Second"]), 2),
            "p50_ms": round(float(row["p50 latency"]) / 1000.0, 1), "p99_ms": round(float(row["p99 latency"]) / 1000.0, 1)}


def gateway_load(url: str, concurrency: int, seconds: float, image: bytes) -> dict:
    from clients.client import SalfClient

    latencies: list[float] = []
    errors = []
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)
    end_at = [0.0]

    def worker():
        with SalfClient(url, timeout=60) as c:
            c.predict(image)  # connect before the clock starts
            start.wait()
            while time.monotonic() < end_at[0]:
                t = time.perf_counter()
                try:
                    c.predict(image)
                except Exception as exc:  # counted, reported
                    errors.append(repr(exc))
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    end_at[0] = time.monotonic() + seconds + 1e9  # set properly once everyone is connected
    start.wait()
    t0 = time.monotonic()
    end_at[0] = t0 + seconds
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    a = np.asarray(latencies) * 1000.0
    return {"images_per_s": round(len(latencies) / elapsed, 2), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1), "errors": len(errors)}


def stream_load(url: str, window: int, seconds: float, image: bytes) -> dict:
    """One client, one Stream call, ``window`` items in flight, for ``seconds``: images/s."""
    from clients.client import SalfClient

    with SalfClient(url, timeout=60) as c:
        c.predict(image)
        end = time.monotonic() + seconds

        def items():
            n = 0
            while time.monotonic() < end:
                yield str(n), c.pb.PredictRequest(image=image)
                n += 1

        t0 = time.monotonic()
        answers = errors = 0
        for r in c.stream(items(), window=window):
            answers += 1
            errors += r.WhichOneof("result") == "error"
        elapsed = time.monotonic() - t0
    return {"images_per_s": round(answers / elapsed, 2), "errors": errors}


def run(perf_binary: Path, repo: Path, concurrencies: list[int], seconds: float, work: Path) -> dict:
    """Per concurrency, interleaved: perf_analyzer straight at Triton, the gateway in front of Triton
    (c unary clients, and one Stream call with window c), and the embedded gateway (Triton idle)."""
    from export.triton_server import TritonServer
    from tests.fixtures.gateway import encode, sample_image, start_salfctl_serve

    config = (repo / "salf_cbm" / "config.pbtxt").read_text()
    meta = json.loads((repo / "salf_model.json").read_text())
    image = encode(sample_image(0, tuple(meta["input_size"])), "PNG")
    results = []
    triton = TritonServer(repo, log_path=work / "triton.log").start()
    serve = embedded = None
    try:
        serve = start_salfctl_serve(repo, work / "serve.log", extra=["--triton", triton.grpc_url])
        embedded = start_salfctl_serve(repo, work / "serve-embedded.log")
        for c in concurrencies:
            before = _counters(triton.metrics_url)
            pa = perf_analyzer(perf_binary, triton.grpc_url, c, int(seconds * 1000 / 2), work)
            middle = _counters(triton.metrics_url)
            gw = gateway_load(serve.url, c, seconds, image)
            after = _counters(triton.metrics_url)
            st = stream_load(serve.url, c, seconds, image)
            st["mean_batch"] = _mean_batch(after, _counters(triton.metrics_url))
            emb = gateway_load(embedded.url, c, seconds, image)
            pa["mean_batch"], gw["mean_batch"] = _mean_batch(before, middle), _mean_batch(middle, after)
            row = {"concurrency": c, "perf_analyzer": pa, "gateway": gw, "stream": st, "embedded": emb,
                   "throughput_ratio": round(gw["images_per_s"] / pa["images_per_s"], 3),
                   "p99_ratio": round(gw["p99_ms"] / pa["p99_ms"], 3)}
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for proc in (serve, embedded):
            if proc is not None:
                proc.stop()
        triton.stop()
    batching = [line.strip() for line in config.splitlines() if not line.strip().startswith("#")
                and ("queue_delay" in line or "preferred" in line or "max_batch_size" in line)]
    return {"config": batching, "seconds": seconds, "results": results}


def table(run_result: dict) -> list[str]:
    lines = ["| clients | perf_analyzer img/s | p50 ms | p99 ms | Triton batch | gateway img/s | p50 ms | p99 ms | "
             "Triton batch | img/s ratio | p99 ratio | Stream img/s (1 call) | embedded img/s | p50 ms | p99 ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in run_result["results"]:
        pa, gw, st, emb = r["perf_analyzer"], r["gateway"], r["stream"], r["embedded"]
        lines.append(f"| {r['concurrency']} | {pa['images_per_s']} | {pa['p50_ms']} | {pa['p99_ms']} | "
                     f"{pa['mean_batch']} | {gw['images_per_s']} | {gw['p50_ms']} | {gw['p99_ms']} | {gw['mean_batch']} | "
                     f"{r['throughput_ratio']} | {r['p99_ratio']} | {st['images_per_s']} | {emb['images_per_s']} | "
                     f"{emb['p50_ms']} | {emb['p99_ms']} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--perf-analyzer", type=Path, required=True)
    ap.add_argument("--repository", type=Path, default=None)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="salf-bench-") as tmp:
        work = Path(tmp)
        repo = args.repository or paper_repository(work)
        result = run(args.perf_analyzer, repo, [int(x) for x in args.concurrency.split(",")], args.seconds, work)
    print("\n".join(["", f"Triton config: {'; '.join(result['config'])}", *table(result)]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
