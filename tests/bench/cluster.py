"""Serving beyond one gateway (issue 23), part of `make bench-serving`: on the paper-size repository, three
gateways behind Envoy on one Triton (deploy/cluster.py, as `make cluster` runs them):

- bytes per Predict and per Explain from Triton to the gateway, as the gateway counted them
  (salf_gateway_backend_received_bytes: the response messages' sizes);
- the Envoy hop: ExplainRegion by id (a cache hit, the gateway's cheapest real call) straight to the gateway
  that holds it and through Envoy (routed there by x-salf-affinity), interleaved, one client; p50s and the
  added p50;
- throughput of c clients with one gateway (straight, no balancer) and with three behind Envoy, for
  Predict (Triton-bound) and for Explain of cached images with five PNG heatmaps (gateway-bound).

    python -m tests.bench.cluster [--repo REPO] [--seconds 10] [--clients 16]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.bench.throughput import gateway_load


def _received(url: str) -> float:
    from tests.cluster import metric_sum

    return metric_sum(url, "salf_gateway_backend_received_bytes_total", model="salf_cbm")


def _bytes(cluster, image_for) -> dict:
    from clients.client import SalfClient

    g = cluster.replicas[0]
    with SalfClient.connect(g.url, timeout=120) as c:
        c.predict(image_for(0))
        n = 10
        before = _received(g.metrics_url)
        for k in range(n):
            c.predict(image_for(k))
        predict = (_received(g.metrics_url) - before) / n
        before = _received(g.metrics_url)
        for k in range(n):
            c.explain(image_for(100 + k), top_k=5, heatmaps="none")  # new images: each one a forward
        explain = (_received(g.metrics_url) - before) / n
    return {"predict": round(predict), "explain": round(explain)}


def _hop(cluster, image: bytes, samples: int) -> dict:
    from clients.client import SalfClient

    with SalfClient.connect(cluster.url, timeout=60) as via:
        e = via.explain(image, top_k=1, heatmaps="none")
        holder = next(g for g in cluster.replicas if g.name == via.last_replica)
        region = via.region(box=(20, 20, 120, 120))
        with SalfClient.connect(holder.url, timeout=60) as direct:
            times = {"direct": [], "envoy": []}
            for c in (direct, via):  # warm-up
                for _ in range(20):
                    c.explain_region(region, explanation_id=e.explanation_id)
            for _ in range(samples):
                for side, c in (("direct", direct), ("envoy", via)):
                    t = time.perf_counter()
                    c.explain_region(region, explanation_id=e.explanation_id)
                    times[side].append(time.perf_counter() - t)
            assert via.last_replica == holder.name, "Envoy did not route the follow-up to the explanation's gateway"
    p50 = {k: round(float(np.percentile(v, 50)) * 1000, 3) for k, v in times.items()}
    return {"samples": samples, "p50_ms": p50, "added_p50_ms": round(p50["envoy"] - p50["direct"], 3)}


def _explain_load(url: str, clients: int, seconds: float, images: list[bytes]) -> dict:
    """``clients`` threads calling Explain (top-5 PNG heatmaps) on images the gateways already hold."""
    import threading

    from clients.client import SalfClient

    done, errors, lock = [0], [0], threading.Lock()
    end = [0.0]
    barrier = threading.Barrier(clients + 1)

    def worker(k):
        with SalfClient(url, timeout=60) as c:
            c.explain(images[k % len(images)], top_k=5)
            barrier.wait()
            n = 0
            while time.monotonic() < end[0]:
                try:
                    c.explain(images[(k + n) % len(images)], top_k=5)
                    with lock:
                        done[0] += 1
                except Exception:  # noqa: BLE001 - counted
                    with lock:
                        errors[0] += 1
                n += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    end[0] = time.monotonic() + 1e9
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.monotonic()
    end[0] = t0 + seconds
    for t in threads:
        t.join()
    return {"explains_per_s": round(done[0] / (time.monotonic() - t0), 2), "errors": errors[0]}


def run(repo: Path, work: Path, seconds: float = 10.0, clients: int = 16, samples: int = 300) -> dict:
    from deploy.cluster import Cluster
    from salf.contract.repository import load_model_spec
    from tests.fixtures.gateway import encode, sample_image

    spec = load_model_spec(repo)
    size = tuple(spec.input_size)
    image_for = lambda k: encode(sample_image(k, size), "PNG")
    with Cluster(repo, work, gateways=3, prometheus=False) as cluster:
        out = {"model": f"{spec.num_concepts} concepts, {spec.num_classes} classes, grid {spec.grid[0]}x{spec.grid[1]}, "
                        f"maps {spec.maps_dtype}",
               "bytes_from_triton": _bytes(cluster, image_for)}
        print(json.dumps(out), flush=True)
        out["envoy_hop"] = _hop(cluster, image_for(500), samples)
        print(json.dumps(out["envoy_hop"]), flush=True)
        predict_image = image_for(600)
        out["predict"] = {"one_gateway": gateway_load(cluster.replicas[0].url, clients, seconds, predict_image),
                          "three_via_envoy": gateway_load(cluster.url, clients, seconds, predict_image)}
        held = [image_for(700 + k) for k in range(8)]
        out["explain_cached"] = {"one_gateway": _explain_load(cluster.replicas[0].url, clients, seconds, held),
                                 "three_via_envoy": _explain_load(cluster.url, clients, seconds, held)}
        out.update(clients=clients, seconds=seconds)
        print(json.dumps({k: out[k] for k in ("predict", "explain_cached")}), flush=True)
    return out


def section(r: dict, target_bytes: int, target_hop_ms: float) -> list[str]:
    """docs/performance.md's section (tests/bench/report.py writes the document)."""
    b, h, p, e = r["bytes_from_triton"], r["envoy_hop"], r["predict"], r["explain_cached"]
    ratio = lambda d, k: d["three_via_envoy"][k] / d["one_gateway"][k] if d["one_gateway"][k] else float("nan")
    return [
        f"Paper-size repository ({r['model']}), three `salfctl serve --triton` gateways behind Envoy "
        f"(deploy/envoy.yaml) on one Triton, all on this machine's cores (tests/bench/cluster.py).", "",
        "| figure | measured | target |", "|---|---:|---:|",
        f"| bytes Triton -> gateway per Predict (scores and logits only) | {b['predict']:,} | <= {target_bytes:,} |",
        f"| bytes Triton -> gateway per Explain (with the concept maps) | {b['explain']:,} | (reported) |",
        f"| ExplainRegion p50 straight to its gateway | {h['p50_ms']['direct']:.3f} ms | |",
        f"| ExplainRegion p50 through Envoy | {h['p50_ms']['envoy']:.3f} ms | |",
        f"| Envoy hop, added p50 ({h['samples']} interleaved pairs) | {h['added_p50_ms']:.3f} ms | <= {target_hop_ms:g} ms |",
        "", f"Throughput, {r['clients']} clients for {r['seconds']:g} s each:", "",
        "| load | 1 gateway | 3 gateways + Envoy | ratio |", "|---|---:|---:|---:|",
        f"| Predict (Triton-bound), img/s | {p['one_gateway']['images_per_s']} | {p['three_via_envoy']['images_per_s']} | "
        f"{ratio(p, 'images_per_s'):.2f} |",
        f"| Predict p50 / p99, ms | {p['one_gateway']['p50_ms']} / {p['one_gateway']['p99_ms']} | "
        f"{p['three_via_envoy']['p50_ms']} / {p['three_via_envoy']['p99_ms']} | |",
        f"| Explain of held images, 5 PNG heatmaps (gateway-bound), calls/s | {e['one_gateway']['explains_per_s']} | "
        f"{e['three_via_envoy']['explains_per_s']} | {ratio(e, 'explains_per_s'):.2f} |",
        f"| errors | {p['one_gateway']['errors'] + e['one_gateway']['errors']} | "
        f"{p['three_via_envoy']['errors'] + e['three_via_envoy']['errors']} | |", "",
        "Every process here shares the same two cores. Predict is bound by Triton's forward, so more gateways only "
        "add the balancer's and the extra processes' cost. Explain of held images is the gateway's own Python work "
        "(heatmaps, PNG encoding), and one gateway process runs it under one interpreter lock: three processes use "
        "both cores. With a GPU Triton the forward leaves the CPU and that gateway work is the limit that more "
        "replicas, on more machines, lift.", ""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=None, help="default: build the paper-size repository")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="salf-bench-cluster-"))
    if args.repo is None:
        from tests.bench.common import paper_repository

        args.repo = paper_repository(work)
    r = run(args.repo, work / "cluster", args.seconds, args.clients)
    print("\n".join(section(r, 25_000, 1.0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
