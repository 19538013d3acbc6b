"""`make bench-serving`: every serving figure of issue 12 in one run, printed as one table and written to
docs/performance.md (do not edit that file: rerun this).

In order, on this machine, with the configuration in the header of the document:
1. explanation cost (tests/bench/overhead.py) at the demo's size and the paper's: Predict, Explain
   (top-5 PNG heatmaps), ExplainRegion and Intervene p50 through real gRPC against a bare onnxruntime
   forward in its own process, interleaved; the gateway's RSS idle and after 1000 Explains; bytes per
   request on the client hop (measured message sizes) and the Triton hop (tensor payloads, float32
   and float16 maps);
2. throughput at 1/8/32 clients at the paper's size (tests/bench/throughput.py): perf_analyzer
   straight at Triton, the gateway in front of Triton (unary clients and one Stream call), and the
   embedded gateway, with Triton's mean executed batch;
3. the mixed load of every RPC by 32 clients on the demo-size model (tests/bench/serving.py), both
   backends: requests/s, p50/p99, failures;
4. beyond one gateway (tests/bench/cluster.py, issue 23): bytes per Predict and Explain from Triton, the
   Envoy hop's added p50, throughput with one gateway and with three behind Envoy.
A benchmark, not a test: figures vary with the machine and its load; compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.bench import cluster, overhead, throughput
from tests.bench.common import cpu_name, paper_repository
from tests.bench.serving import run_load

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {"ratio": 1.3, "fixed_ms": 1.0, "intervene_x": 20.0, "throughput": 0.95, "p99": 1.2,
           "predict_bytes": 25_000, "envoy_hop_ms": 1.0}


def _verdict(ok: bool) -> str:
    return "holds" if ok else "MISSES"


def summary(sizes: dict, tp: dict, cl: dict | None = None) -> list[str]:
    """The combined table: one row per figure with its target and whether it holds."""
    rows = ["| figure | measured | target | |", "|---|---:|---:|---|"]
    paper, demo = sizes.get("paper"), sizes.get("demo")
    if paper:
        q = paper["ratio_to_forward"]
        for k in ("Predict", "Explain", "ExplainRegion"):
            rows.append(f"| paper size: {k} p50 / bare forward | {q[k]:.2f}x | <= {TARGETS['ratio']}x | "
                        f"{_verdict(q[k] <= TARGETS['ratio'])} |")
        x = paper["intervene_cheaper_than_forward_x"]
        rows.append(f"| paper size: Intervene cheaper than a forward | {x:.1f}x | >= {TARGETS['intervene_x']:.0f}x | "
                    f"{_verdict(x >= TARGETS['intervene_x'])} |")
        rss = paper["gateway_rss_mb"]
        rows.append(f"| paper size: gateway RSS idle -> after {paper['explains']} Explains | "
                    f"{rss['idle']:.0f} -> {list(rss.values())[1]:.0f} MB | (reported) | |")
    if demo:
        d = demo["explain_minus_forward_ms"]
        rows.append(f"| demo size: Explain p50 minus the forward | {d:.2f} ms | <= {TARGETS['fixed_ms']:.0f} ms | "
                    f"{_verdict(d <= TARGETS['fixed_ms'])} |")
    if cl:
        b, hop = cl["bytes_from_triton"]["predict"], cl["envoy_hop"]["added_p50_ms"]
        rows.append(f"| paper size: bytes Triton -> gateway per Predict | {b:,} | <= {TARGETS['predict_bytes']:,} | "
                    f"{_verdict(b <= TARGETS['predict_bytes'])} |")
        rows.append(f"| Envoy hop: added p50 (ExplainRegion by id) | {hop:.3f} ms | <= {TARGETS['envoy_hop_ms']:g} ms | "
                    f"{_verdict(hop <= TARGETS['envoy_hop_ms'])} |")
    for r in (tp or {}).get("results", []):
        c = r["concurrency"]
        rows.append(f"| paper size, {c} clients: gateway/Triton img/s vs perf_analyzer | {r['throughput_ratio']:.3f} | "
                    f">= {TARGETS['throughput']} | {_verdict(r['throughput_ratio'] >= TARGETS['throughput'])} |")
        rows.append(f"| paper size, {c} clients: gateway/Triton p99 vs perf_analyzer's | {r['p99_ratio']:.3f} | "
                    f"<= {TARGETS['p99']} | {_verdict(r['p99_ratio'] <= TARGETS['p99'])} |")
    return rows


def bytes_table(sizes: dict) -> list[str]:
    lines = ["| size | RPC | client -> gateway | gateway -> client | gateway -> Triton | Triton -> gateway, "
             "float32 maps | same, float16 maps |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in sizes.items():
        b = r["bytes"]
        for rpc, (req, resp) in b["client"].items():
            t32, t16 = b["triton"]["float32"][rpc], b["triton"]["float16"][rpc]
            lines.append(f"| {name} | {rpc} | {req:,} | {resp:,} | {t32[0]:,}"
                         f"{' (' + format(t16[0], ',') + ' fp16)' if t16[0] != t32[0] else ''} | {t32[1]:,} | {t16[1]:,} |")
    return lines


def mixed_table(mixed: dict) -> list[str]:
    lines = ["| backend | requests/s | failures | p50 ms | p99 ms | per RPC p50 / p99 ms |", "|---|---:|---:|---:|---:|---|"]
    for backend, r in mixed.items():
        per = "; ".join(f"{k} {v['p50_ms']} / {v['p99_ms']}" for k, v in r["per_rpc"].items())
        lines.append(f"| {backend} | {r['requests_per_s']} | {r['failures']} | {r['all'].get('p50_ms')} | "
                     f"{r['all'].get('p99_ms')} | {per} |")
    return lines


def mixed_load(work: Path, clients: int, seconds: float) -> dict:
    from export.repository import export_repository
    from export.triton_server import TritonServer
    from tests.fixtures.bundles import make_random_bundle
    from tests.fixtures.gateway import start_salfctl_serve

    repo = work / "mixed" / "model_repository"
    export_repository(make_random_bundle(work / "mixed" / "bundle", seed=0), repo, flavour="python", parity=False)
    results = {}
    for backend in ("embedded", "triton"):
        triton = TritonServer(repo, log_path=work / "mixed-triton.log", poll_secs=0).start() if backend == "triton" else None
        serve = start_salfctl_serve(repo, work / f"mixed-{backend}.log", extra=["--triton", triton.grpc_url] if triton else [])
        try:
            run_load(serve.url, 2, 2.0)  # warm-up
            results[backend] = run_load(serve.url, clients, seconds)
        finally:
            serve.stop(grace=10.0)
            if triton:
                triton.stop()
        print(json.dumps({backend: {k: v for k, v in results[backend].items() if k != "failure_examples"}}), flush=True)
    return results


def render(doc: dict, command: str, measured_at: str | None = None) -> str:
    cpu = cpu_name()
    sizes, tp, mixed, cl = doc["sizes"], doc.get("throughput"), doc.get("mixed"), doc.get("cluster")
    lines = ["# Performance", "",
             f"Generated by `{command}` (tests/bench/report.py), measured {measured_at or 'at an unrecorded time'}, "
             f"{cpu}, {os.cpu_count()} cores, CPU only, Python {platform.python_version()}. Do not edit: rerun the "
             "benchmark. Figures vary with the machine and its load; the ratios within one run are what compares.", "",
             "## Summary against the targets of issues 12 and 23", "", *summary(sizes, tp, cl), "",
             "## Explanation cost next to a forward pass", "",
             "Latencies are client-side p50 through real gRPC to `salfctl serve` (embedded onnxruntime backend, its "
             "own process); the forward is a bare onnxruntime run of `salf_cbm` at batch 1 in another process with "
             "the gateway idle, interleaved round by round with the gateway's calls. ExplainRegion and Intervene "
             "refer to a cached explanation (no forward); each Explain is of a new image of the same size (ids are "
             "content-addressed: the same image again would be answered from the cache).", ""]
    for r in sizes.values():
        lines += overhead.size_section(r)
    lines += ["## Bytes per request", "",
              "Client hop: the serialized request and response messages as measured (Explain with five 8-bit PNG "
              "heatmaps at the image's size; the image is the JPEG above). Triton hop: the tensor payloads of the "
              "gateway's requests to Triton (the decoded uint8 image in; concept maps, scores and logits out; "
              "Intervene sends the maps before and after the edit to `salf_head`), with float32 maps (the default) "
              "and float16 (`salfctl export --maps-dtype float16`, docs/DESIGN.md \"Maps dtype\").", "",
              *bytes_table(sizes), ""]
    if tp:
        lines += ["## Throughput at 1/8/32 clients (paper size)", "",
                  "Triton (python-backend flavour, one instance) `salf_cbm` config: "
                  f"{'; '.join(c for c in tp['config'] if not c.startswith('#'))} "
                  "(why: [batching.md](batching.md), `make bench-batching`). perf_analyzer (tritonclient 2.46) sends "
                  "random uint8 224x224x3 tensors over gRPC with c requests in flight; the gateway sides are c client "
                  f"threads calling Predict with a 224x224 PNG for {tp['seconds']:g} s each (on `salfctl serve --triton`, "
                  "then on `salfctl serve` embedded with Triton idle), and one client with one Stream call of window c; "
                  "Triton batch = its executed-batch mean over each side's window.", "", *throughput.table(tp), ""]
    if mixed:
        lines += [f"## Mixed load: {doc['mixed_clients']} clients, every RPC, demo-size model", "",
                  "Each client picks Predict, Explain (3 heatmaps), ExplainRegion, Intervene or GetModelInfo at random "
                  f"for {doc['mixed_seconds']:g} s (tests/bench/serving.py).", "", *mixed_table(mixed), ""]
    if cl:
        lines += ["## Beyond one gateway: Triton bytes, the Envoy hop, 1 vs 3 gateways (paper size)", "",
                  *cluster.section(cl, TARGETS["predict_bytes"], TARGETS["envoy_hop_ms"])]
    lines += ["Not measured here: the GPU path (`--device cuda`, KIND_GPU, TensorRT); this machine has no GPU "
              "(issue 12, section 5).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--perf-analyzer", type=Path, default=None, help="without it, no throughput section")
    ap.add_argument("--sizes", default="demo,paper")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--explains", type=int, default=1000)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--mixed-clients", type=int, default=32)
    ap.add_argument("--mixed-seconds", type=float, default=10.0, help="0: skip the mixed load")
    ap.add_argument("--cluster-seconds", type=float, default=10.0,
                    help="per load of the three-gateway section; 0: skip it")
    ap.add_argument("--cluster-clients", type=int, default=16)
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "performance.md")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--from-json", type=Path, default=None,
                    help="re-render the document from the JSON of an earlier run instead of measuring")
    args = ap.parse_args(argv)
    if args.from_json is not None:
        doc = json.loads(args.from_json.read_text())
        text = render(doc, doc.get("command", "make bench-serving"), doc.get("measured_at"))
        print("\n" + text)
        args.doc.write_text(text)
        print(f"re-rendered {args.doc} from {args.from_json}", file=sys.stderr)
        return 0
    doc: dict = {"sizes": {}, "mixed_clients": args.mixed_clients, "mixed_seconds": args.mixed_seconds,
                 "measured_at": time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
    work = Path(tempfile.mkdtemp(prefix="salf-bench-serving-"))
    try:
        for size in args.sizes.split(","):
            print(f"== explanation cost: {size}", file=sys.stderr)
            doc["sizes"][size] = overhead.measure(size, work, args.rounds, args.per_round, args.explains)
            print(json.dumps(doc["sizes"][size]), flush=True)
        if args.perf_analyzer is not None:
            print("== throughput (paper size)", file=sys.stderr)
            tp_work = work / "throughput"
            tp_work.mkdir()
            repo = paper_repository(tp_work)
            doc["throughput"] = throughput.run(args.perf_analyzer, repo, [int(x) for x in args.concurrency.split(",")],
                                               args.seconds, tp_work)
        if args.cluster_seconds > 0:
            print("== beyond one gateway: Envoy + 3 gateways on one Triton (paper size)", file=sys.stderr)
            cl_work = work / "cluster"
            cl_work.mkdir()
            cl_repo = repo if args.perf_analyzer is not None else paper_repository(cl_work)
            doc["cluster"] = cluster.run(cl_repo, cl_work / "run", args.cluster_seconds, args.cluster_clients)
        if args.mixed_seconds > 0:
            print("== mixed load (demo size)", file=sys.stderr)
            doc["mixed"] = mixed_load(work, args.mixed_clients, args.mixed_seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shown = list(sys.argv[1:] if argv is None else argv)
    for flag in ("--json", "--perf-analyzer"):  # the Makefile's own paths, not choices of the run
        if flag in shown:
            k = shown.index(flag)
            del shown[k:k + 2]
    command = "make bench-serving" + (f" BENCH_SERVING_ARGS='{' '.join(shown)}'" if shown else "")
    doc["command"] = command
    text = render(doc, command, doc["measured_at"])
    print("\n" + text)  # every table of the document, the summary against the targets first
    if args.doc:
        args.doc.write_text(text)
        print(f"wrote {args.doc}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
