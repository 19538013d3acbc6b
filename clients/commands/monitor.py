"""`salfctl monitor`: the live view of the gateway's and Triton's metrics (scraping and the snapshot
arithmetic are the library clients/monitor.py)."""
from __future__ import annotations

import time
from typing import Optional

import typer

from salf.cli import EXIT_UNREACHABLE, Json


def monitor(gateway: Optional[str] = typer.Option("http://127.0.0.1:9464/metrics", "--gateway",
                                              help="The gateway's metrics URL ('' to leave it out)."),
            triton: Optional[str] = typer.Option(None, "--triton",
                                                 help="Triton's metrics URL, e.g. http://127.0.0.1:8002/metrics."),
            interval: float = typer.Option(2.0, "--interval", help="Seconds between refreshes (and between the two "
                                                                   "scrapes of --once)."),
            once: bool = typer.Option(False, "--once", help="One snapshot (two scrapes --interval apart), then exit."),
            as_json: Json = False) -> None:
    """Live view of the gateway's and Triton's metrics: requests/s, p50/p99 per RPC, errors by code, cache
    hit rate, and per Triton model requests/s, average executed batch size, queue and compute time."""
    import json as _json

    from rich.console import Console
    from rich.live import Live

    from .. import monitor as mon

    if interval <= 0:
        raise typer.BadParameter("--interval must be > 0")
    urls = {"gateway": gateway or None, "triton": triton or None}
    if not any(urls.values()):
        raise typer.BadParameter("give --gateway and/or --triton")

    def scrape() -> dict:
        return {k: mon.fetch(u) for k, u in urls.items() if u}

    def snap(prev, cur) -> dict:
        return mon.snapshot(*((prev.get(k), cur[k]) if k in cur else None for k in ("gateway", "triton")))

    prev = scrape()
    if once:
        time.sleep(interval)
        doc = snap(prev, scrape())
        if as_json:
            print(_json.dumps(doc), flush=True)
        else:
            Console().print(mon.render(doc))
        raise typer.Exit(0 if all(section["up"] for section in doc.values()) else EXIT_UNREACHABLE)
    with Live(mon.render({}), refresh_per_second=4, console=Console()) as live:
        try:
            while True:
                time.sleep(interval)
                cur = scrape()
                live.update(mon.render(snap(prev, cur)))
                prev = cur
        except KeyboardInterrupt:
            pass
