"""`salfctl monitor`: a live view of the gateway's and Triton's Prometheus endpoints (STYLE 15).

Two scrapes ``dt`` seconds apart make a :func:`snapshot`, a plain dict of rates and latencies computed
from the counters' and histograms' deltas (the same arithmetic as PromQL's ``rate`` and
``histogram_quantile``); the rich table and ``--once --json`` are two renderings of it. Either endpoint
may be down: its section then says why, and the view keeps refreshing.

Triton's average executed batch size is ``delta nv_inference_count / delta nv_inference_exec_count``
per model: above 1 means the dynamic batcher is merging requests.
"""
from __future__ import annotations

import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

Sample = tuple[str, tuple[tuple[str, str], ...], float]  # (name, sorted labels, value)


@dataclass
class Scrape:
    """One read of a metrics endpoint: samples by (name, labels), or the reason it failed."""
    url: str
    at: float
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)
    error: str | None = None

    def _names(self, name: str) -> tuple[str, ...]:
        # prometheus_client's parser names a counter's samples <family>_total even when the exposition
        # (Triton's nv_inference_count) has no such suffix: accept both spellings.
        return (name,) if name.endswith("_total") else (name, f"{name}_total")

    def get(self, name: str, **labels) -> float:
        """Sum of the samples named ``name`` whose labels include ``labels``."""
        want, names = set(labels.items()), self._names(name)
        return sum(v for (n, ls), v in self.values.items() if n in names and want <= set(ls))

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        names = self._names(name)
        return [(dict(ls), v) for (n, ls), v in self.values.items() if n in names]


def parse(text: str, url: str = "", at: float = 0.0) -> Scrape:
    """Prometheus text exposition -> :class:`Scrape` (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    scrape = Scrape(url, at)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            scrape.values[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return scrape


def fetch(url: str, timeout: float = 2.0) -> Scrape:
    """Scrape ``url``; a failure is recorded in ``error``, never raised."""
    at = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return parse(resp.read().decode("utf-8", errors="replace"), url, at)
    except Exception as exc:  # down, refused, not Prometheus text: the view says so and keeps going
        return Scrape(url, at, error=f"{type(exc).__name__}: {exc}")


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """``histogram_quantile`` over cumulative ``(le, count)`` deltas (linear inside a bucket)."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            width = count - prev_count
            return prev_le + (le - prev_le) * ((rank - prev_count) / width if width > 0 else 1.0)
        prev_le, prev_count = le, count
    return prev_le


def _delta(cur: Scrape, prev: Scrape | None, name: str, **labels) -> float:
    return cur.get(name, **labels) - (prev.get(name, **labels) if prev is not None else 0.0)


def gateway_section(cur: Scrape, prev: Scrape | None, dt: float) -> dict:
    if cur.error:
        return {"url": cur.url, "up": False, "error": cur.error}
    methods = sorted({labels["method"] for labels, _ in cur.series("salf_gateway_requests_total")})
    rpcs, errors = {}, defaultdict(float)
    for method in methods:
        buckets = defaultdict(float)
        for labels, value in cur.series("salf_gateway_request_seconds_bucket"):
            if labels.get("method") == method:
                before = prev.get("salf_gateway_request_seconds_bucket", **labels) if prev else 0.0
                buckets[float(labels["le"])] += value - before
        p50, p99 = _quantile(0.5, list(buckets.items())), _quantile(0.99, list(buckets.items()))
        rpcs[method] = {"requests_per_s": _delta(cur, prev, "salf_gateway_requests_total", method=method) / dt,
                        "p50_ms": None if p50 is None else p50 * 1000, "p99_ms": None if p99 is None else p99 * 1000,
                        "in_flight": cur.get("salf_gateway_in_flight_requests", method=method)}
    for labels, value in cur.series("salf_gateway_requests_total"):
        if labels.get("code") != "OK":
            before = prev.get("salf_gateway_requests_total", **labels) if prev else 0.0
            errors[labels["code"]] += value - before
    hits = _delta(cur, prev, "salf_gateway_cache_hits_total")
    misses = _delta(cur, prev, "salf_gateway_cache_misses_total")
    info = next((labels for labels, _ in cur.series("salf_gateway_model_info")), {})
    mean_z = {labels["concept"]: v for labels, v in cur.series("salf_gateway_drift_mean_z")}
    drift = sorted(({"concept": labels["concept"], "psi": v, "mean_z": mean_z.get(labels["concept"])}
                    for labels, v in cur.series("salf_gateway_drift_psi")), key=lambda d: -d["psi"])
    shifted = _delta(cur, prev, "salf_gateway_concept_shifted_requests_total")
    observed = _delta(cur, prev, "salf_gateway_concept_abs_z_count")
    return {"url": cur.url, "up": True, "model": info, "rpcs": rpcs,
            "errors": {code: n for code, n in sorted(errors.items()) if n > 0},
            "cache_hit_rate": hits / (hits + misses) if hits + misses > 0 else None,
            "drift": {"window": cur.get("salf_gateway_drift_window_requests"), "top": drift,
                      "shifted_share": shifted / observed if observed > 0 else None}}


def triton_section(cur: Scrape, prev: Scrape | None, dt: float) -> dict:
    if cur.error:
        return {"url": cur.url, "up": False, "error": cur.error}
    models = {}
    for name in sorted({labels["model"] for labels, _ in cur.series("nv_inference_count")}):
        count = _delta(cur, prev, "nv_inference_count", model=name)
        execs = _delta(cur, prev, "nv_inference_exec_count", model=name)
        ok = _delta(cur, prev, "nv_inference_request_success", model=name)
        queue = _delta(cur, prev, "nv_inference_queue_duration_us", model=name)
        compute = _delta(cur, prev, "nv_inference_compute_infer_duration_us", model=name)
        models[name] = {"requests_per_s": ok / dt, "avg_batch_size": count / execs if execs > 0 else None,
                        "queue_ms": queue / ok / 1000 if ok > 0 else None,
                        "compute_ms": compute / ok / 1000 if ok > 0 else None,
                        "failures": _delta(cur, prev, "nv_inference_request_failure", model=name)}
    return {"url": cur.url, "up": True, "models": models}


def snapshot(gateway: tuple[Scrape, Scrape] | None, triton: tuple[Scrape, Scrape] | None) -> dict:
    """The view's data from ``(previous, current)`` scrapes of each endpoint given."""
    doc: dict = {}
    for key, pair, section in (("gateway", gateway, gateway_section), ("triton", triton, triton_section)):
        if pair is None:
            continue
        prev, cur = pair
        prev = None if prev is None or prev.error else prev
        dt = max(cur.at - prev.at, 1e-9) if prev is not None else 1.0
        doc[key] = {**section(cur, prev, dt), "interval_s": round(dt, 3) if prev is not None else None}
    return doc


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def render(doc: dict):
    """The rich renderable of a snapshot."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts = []
    g = doc.get("gateway")
    if g is not None:
        if not g["up"]:
            parts.append(Text(f"gateway {g['url']}: DOWN ({g['error']})", style="bold red"))
        else:
            hit = g["cache_hit_rate"]
            t = Table(title=f"gateway {g['url']}  model v{g['model'].get('version', '?')} "
                            f"({g['model'].get('backend', '?')})  cache hit rate {_fmt(hit and hit * 100)}%")
            for col in ("rpc", "req/s", "p50 ms", "p99 ms", "in flight"):
                t.add_column(col, justify="left" if col == "rpc" else "right")
            for method, r in g["rpcs"].items():
                t.add_row(method, _fmt(r["requests_per_s"]), _fmt(r["p50_ms"]), _fmt(r["p99_ms"]),
                          _fmt(r["in_flight"], ".0f"))
            parts.append(t)
            errors = ", ".join(f"{code} {n:.0f}" for code, n in g["errors"].items()) or "none"
            parts.append(Text(f"errors in the interval: {errors}"))
            d = g.get("drift") or {}
            if d.get("top"):
                moved = ", ".join(f"{t['concept']!r} PSI {t['psi']:.2f} ({_fmt(t['mean_z'], '+.1f')} sigma)"
                                  for t in d["top"])
                share = d.get("shifted_share")
                parts.append(Text(f"concept drift over the last {d['window']:.0f} requests: {moved}"
                                  + (f"; {share * 100:.0f}% of requests in the interval had mean |z| > 2"
                                     if share is not None else ""),
                                  style="bold yellow" if d["top"][0]["psi"] > 0.25 else ""))
    tr = doc.get("triton")
    if tr is not None:
        if not tr["up"]:
            parts.append(Text(f"triton {tr['url']}: DOWN ({tr['error']})", style="bold red"))
        else:
            t = Table(title=f"triton {tr['url']}")
            for col in ("model", "req/s", "avg batch", "queue ms", "compute ms", "failures"):
                t.add_column(col, justify="left" if col == "model" else "right")
            for name, m in tr["models"].items():
                t.add_row(name, _fmt(m["requests_per_s"]), _fmt(m["avg_batch_size"], ".2f"), _fmt(m["queue_ms"], ".2f"),
                          _fmt(m["compute_ms"], ".2f"), _fmt(m["failures"], ".0f"))
            parts.append(t)
    return Group(*parts)
