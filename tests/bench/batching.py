"""`make bench-batching`: the measurements behind the dynamic batcher's settings in `config.pbtxt`
(issue 12), at the paper's size (random weights, `salfctl train random`), python-backend flavour.

1. The bare forward's cost per image at batch 1..32 (onnxruntime in this process, Triton not running):
   whether batches pay at all, and whether some sizes are cheaper than their neighbours (that is what
   `preferred_batch_size` is for; on a curve without such steps it only makes the batcher wait).
2. For each `max_queue_delay_microseconds` candidate, a Triton with that config and `perf_analyzer`
   (tritonclient 2.46) at concurrency 1, 8 and 32: images/s, p50/p99, Triton's mean executed batch.
The chosen delay is the smallest whose images/s at 8 and 32 clients is within 10% of the best
candidate's (this shared 2-core machine's run-to-run noise: perf_analyzer gave 14.2 and 15.4 images/s
for the same config in two runs) and whose p50 at one client is within 5% of no delay's (a lone
request waits the whole delay: a cost every run shows, unlike p99, which noise dominates).
Writes docs/batching.md (and JSON with --json). A benchmark, not a test: compare within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.bench.common import ROOT, cpu_name, paper_repository
from tests.bench.throughput import _counters, _mean_batch, perf_analyzer

BATCHES = (1, 2, 4, 8, 16, 32)
DELAYS_US = (0, 500, 2000, 10000)
CONCURRENCY = (1, 8, 32)


def per_image_cost(model: Path, size: tuple[int, int], repeats: int = 3) -> list[dict]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    rows = []
    for b in BATCHES:
        x = rng.integers(0, 256, (b, *size, 3), dtype=np.uint8)
        sess.run(None, {"image": x})
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            sess.run(None, {"image": x})
            times.append(time.perf_counter() - t)
        ms = float(np.median(times)) * 1000.0
        rows.append({"batch": b, "ms": round(ms, 1), "ms_per_image": round(ms / b, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


NOISE = 0.10  # images/s differences smaller than this share are not told apart on this machine


def choose(results: list[dict]) -> int:
    def at(delay, c, key):
        return next(r[key] for r in results if r["delay_us"] == delay and r["concurrency"] == c)

    best = {c: max(at(d, c, "images_per_s") for d in DELAYS_US) for c in (8, 32)}
    for d in DELAYS_US:
        if all(at(d, c, "images_per_s") >= (1 - NOISE) * best[c] for c in (8, 32)) and \
                at(d, 1, "p50_ms") <= 1.05 * at(0, 1, "p50_ms"):
            return d
    return max(DELAYS_US, key=lambda d: at(d, 8, "images_per_s") + at(d, 32, "images_per_s"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--perf-analyzer", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=6.0, help="perf_analyzer measurement interval per point")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "batching.md")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="re-render the document from the JSON of an earlier run instead of measuring")
    args = ap.parse_args(argv)
    measured_at = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    if args.from_json is not None:
        earlier = json.loads(args.from_json.read_text())
        costs, results, measured_at = earlier["costs"], earlier["delays"], earlier.get("measured_at", "an earlier run")
    else:
        costs, results = measure(args)
    render(args, costs, results, measured_at)
    return 0


def measure(args) -> tuple[list[dict], list[dict]]:
    from export.repository import write_flavour
    from export.triton_config import TritonOptions
    from export.triton_server import TritonServer

    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="salf-batching-") as tmp:
        work = Path(tmp)
        repo = paper_repository(work)
        meta = json.loads((repo / "salf_model.json").read_text())
        costs = per_image_cost(next(repo.glob("salf_cbm/*/model.onnx")), tuple(meta["input_size"]))
        for delay in DELAYS_US:
            write_flavour(repo, "python", TritonOptions(max_queue_delay_us=delay))
            triton = TritonServer(repo, log_path=work / f"triton-{delay}.log").start()
            try:
                for c in CONCURRENCY:
                    before = _counters(triton.metrics_url)
                    pa = perf_analyzer(args.perf_analyzer, triton.grpc_url, c, int(args.seconds * 1000), work)
                    row = {"delay_us": delay, "concurrency": c, **pa,
                           "mean_batch": _mean_batch(before, _counters(triton.metrics_url))}
                    results.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                triton.stop()
    return costs, results


def render(args, costs: list[dict], results: list[dict], measured_at: str) -> None:
    chosen = choose(results)
    cost_table = ["| batch | ms | ms per image |", "|---:|---:|---:|",
                  *(f"| {r['batch']} | {r['ms']} | {r['ms_per_image']} |" for r in costs)]
    delay_table = ["| max_queue_delay µs | clients | img/s | p50 ms | p99 ms | Triton batch |",
                   "|---:|---:|---:|---:|---:|---:|",
                   *(f"| {r['delay_us']} | {r['concurrency']} | {r['images_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
                     f"{r['mean_batch']} |" for r in results)]
    steps = [b for i, b in enumerate(BATCHES[1:-1], 1)
             if costs[i]["ms_per_image"] < 0.9 * min(costs[i - 1]["ms_per_image"], costs[i + 1]["ms_per_image"])]
    print("\n".join(["", *cost_table, "", *delay_table, "", f"chosen max_queue_delay_microseconds: {chosen}"]))
    if args.doc:
        cpu = cpu_name()
        args.doc.write_text("\n".join([
            "# Dynamic batching: what the settings in `config.pbtxt` rest on", "",
            f"Generated by `make bench-batching` (tests/bench/batching.py), measured {measured_at}"
            f"{', rendered ' + time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()) if args.from_json else ''}, {cpu}, {os.cpu_count()} cores, CPU only. Do not "
            "edit: rerun the benchmark. Model: the paper's size, random weights, python-backend flavour.", "",
            "## The forward's cost per image by batch size (bare onnxruntime)", "", *cost_table, "",
            ("Sizes cheaper per image than both neighbours by 10% or more: " + ", ".join(map(str, steps)) + "."
             if steps else "No batch size is cheaper per image than both its neighbours by 10% or more: the cost "
             "falls smoothly, so `preferred_batch_size` is left unset (it would only make the batcher hold "
             "requests to reach a size that is not special); the batcher then sends everything queued, up to "
             "`max_batch_size`."), "",
            "## Queue delay, perf_analyzer straight at Triton", "", *delay_table, "",
            f"Chosen: `max_queue_delay_microseconds: {chosen}`: the smallest delay whose images/s at 8 and 32 "
            f"clients is within {NOISE:.0%} of the best candidate's (this machine's run-to-run noise) and whose p50 "
            "at one client is within 5% of no delay's (a lone request waits the whole delay). On two CPU cores a "
            "batch of the forward takes tens of milliseconds, so requests queue behind the running one and merge "
            "without any delay (see the mean batch at 32 clients); a GPU finishes a batch far sooner and is where "
            "a delay buys larger batches: rerun this there (`make bench-batching`) before changing it. "
            "`salfctl export --max-queue-delay-us` overrides it per export.", ""]))
        print(f"wrote {args.doc}", file=sys.stderr)
    if args.json and not args.from_json:
        args.json.write_text(json.dumps({"costs": costs, "delays": results, "chosen_us": chosen,
                                         "measured_at": measured_at}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
