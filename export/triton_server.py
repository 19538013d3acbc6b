"""Start a real Triton Inference Server against a model repository (``make triton``, the test fixture).

The binary is the Triton 2.51 ``tritonserver`` inside the ``nvidia-pytriton==0.7.0`` wheel, installed
in its own environment ``.venv-triton`` by ``make triton-env`` (python backend only). Its python-backend
stub was built for NumPy 1, so the stub's Python must be that environment (``numpy<2`` +
``onnxruntime``): the launcher puts the environment's ``bin/`` first on ``PATH``. The stub for the
running Python version is copied into the backend folder once (``prepare_backends``).

Ports: bound to port 0 to learn free ones, released, then handed to Triton; if Triton loses the race
for a port it exits at once and the launcher retries with new ports. Readiness is polled on
``/v2/health/ready`` with a deadline while checking that the process is alive; the server log goes to
a file that error messages quote. ``stop`` sends SIGTERM, waits a grace period, then SIGKILL.

This module uses the standard library only, so it runs from either environment.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ENV = REPO_ROOT / ".venv-triton"
ENV_VAR = "SALF_TRITON_ENV"
STUB_NAME = "triton_python_backend_stub"


class TritonError(RuntimeError):
    """Triton could not be found, prepared or started."""


@dataclass(frozen=True)
class TritonInstall:
    """Paths of the pytriton-shipped server inside a Triton environment."""

    env: Path
    root: Path  # .../site-packages/pytriton/tritonserver

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / "backends"

    @property
    def python(self) -> Path:
        return self.env / "bin" / "python"


def find_install(env: str | Path | None = None) -> TritonInstall:
    """Locate the Triton environment (argument, ``$SALF_TRITON_ENV``, or ``.venv-triton``)."""
    env_path = Path(env or os.environ.get(ENV_VAR) or DEFAULT_ENV).resolve()
    roots = sorted(env_path.glob("lib/python3*/site-packages/pytriton/tritonserver"))
    if not roots:
        raise TritonError(f"no Triton server under {env_path}: run `make triton-env` "
                          f"(or set {ENV_VAR} to an environment with nvidia-pytriton==0.7.0, numpy<2, onnxruntime)")
    install = TritonInstall(env_path, roots[-1])
    if not os.access(install.binary, os.X_OK):
        raise TritonError(f"{install.binary} is missing or not executable")
    return install


def _env_python_version(install: TritonInstall) -> str:
    out = subprocess.run([str(install.python), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def prepare_backends(install: TritonInstall) -> Path:
    """Copy the python-backend stub for the environment's Python next to ``libtriton_python.so``
    (idempotent); returns the backend directory to pass to ``--backend-directory``."""
    target = install.backends / "python" / STUB_NAME
    if not target.exists():
        version = _env_python_version(install)
        source = install.root / "python_backend_stubs" / version / STUB_NAME
        if not source.is_file():
            raise TritonError(f"pytriton ships no python-backend stub for Python {version} ({source})")
        shutil.copy2(source, target)
        log.info("installed python-backend stub for Python %s at %s", version, target)
    return install.backends


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports the OS reports free right now (bound to port 0, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class TritonServer:
    """A running ``tritonserver`` process. Use as a context manager or call start()/stop().

    ``grpc_url`` (``host:port``, what tritonclient.grpc wants), ``http_url`` (``host:port``),
    ``metrics_url`` (full ``http://.../metrics``), ``repository``, ``log_path``.
    """

    def __init__(self, repository: str | Path, log_path: str | Path | None = None, env: str | Path | None = None,
                 http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0, host: str = "127.0.0.1",
                 extra_args: tuple[str, ...] = (), ready_timeout_s: float = 120.0, bind: str = "127.0.0.1",
                 poll_secs: int = 2) -> None:
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise TritonError(f"model repository {self.repository} does not exist")
        if not any(p.is_file() for p in self.repository.glob("*/config.pbtxt")):
            raise TritonError(f"model repository {self.repository} holds no models (no */config.pbtxt): "
                              f"write one with `salfctl export BUNDLE --out {self.repository} --flavour python`")
        self.install = find_install(env)
        self.log_path = Path(log_path) if log_path else self.repository.parent / "tritonserver.log"
        self.host = host
        self.bind = bind  # the interface all three endpoints listen on: loopback unless opened on purpose
        # Poll the repository: a new model version written by `salfctl export` is loaded (and the oldest
        # of the three kept unloaded) without a restart; 0 loads the repository once.
        self.poll_secs = int(poll_secs)
        self.requested_ports = (http_port, grpc_port, metrics_port)
        self.extra_args = tuple(extra_args)
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen | None = None
        self.http_port = self.grpc_port = self.metrics_port = 0

    # ----------------------------------------------------------------- urls
    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    # ----------------------------------------------------------------- lifecycle
    def _command(self, backends: Path) -> list[str]:
        return [str(self.install.binary), f"--model-repository={self.repository}",
                f"--backend-directory={backends}", f"--http-port={self.http_port}",
                f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}",
                f"--http-address={self.bind}", f"--grpc-address={self.bind}", f"--metrics-address={self.bind}",
                "--allow-metrics=true", "--allow-gpu-metrics=false", "--strict-readiness=true",
                "--exit-timeout-secs=10", "--log-verbose=0",
                # No pinned host memory: CPU-only hosts have no CUDA driver to allocate it with.
                "--pinned-memory-pool-byte-size=0",
                *(("--model-control-mode=poll", f"--repository-poll-secs={self.poll_secs}") if self.poll_secs else ()),
                *self.extra_args]

    def _environment(self) -> dict:
        env = dict(os.environ)
        # The stub runs the first `python3` environment on PATH: it must be the numpy<2 one.
        env["PATH"] = f"{self.install.env / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.install.env)
        for key in ("PYTHONPATH", "PYTHONHOME"):
            env.pop(key, None)
        return env

    def start(self, attempts: int = 3) -> "TritonServer":
        backends = prepare_backends(self.install)
        for attempt in range(1, attempts + 1):
            ports = free_ports(3)
            self.http_port, self.grpc_port, self.metrics_port = (
                req or free for req, free in zip(self.requested_ports, ports))
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log_file:
                log.info("starting Triton (attempt %d): http %d grpc %d metrics %d, log %s", attempt,
                         self.http_port, self.grpc_port, self.metrics_port, self.log_path)
                self.process = subprocess.Popen(self._command(backends), stdout=log_file, stderr=subprocess.STDOUT,
                                                env=self._environment(), start_new_session=True)
            try:
                self.wait_ready()
                return self
            except TritonError:
                port_race = self.process.poll() is not None and "already in use" in self.log_tail(4000)
                self.stop()
                if not port_race or attempt == attempts or any(self.requested_ports):
                    raise
                log.warning("Triton lost a port race; retrying with new ports")
        raise TritonError("unreachable")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Poll readiness until the deadline; fail at once (quoting the log) if the process exits."""
        deadline = time.monotonic() + (timeout_s or self.ready_timeout_s)
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise TritonError(f"tritonserver exited with code {code} before becoming ready; "
                                  f"log {self.log_path}:\n{self.log_tail()}")
            if self.ready():
                log.info("Triton ready at http %s grpc %s", self.http_url, self.grpc_url)
                return
            time.sleep(0.25)
        raise TritonError(f"tritonserver not ready after {timeout_s or self.ready_timeout_s:.0f} s; "
                          f"log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM, wait ``grace_s``, then SIGKILL; returns the exit code (None if never started)."""
        proc, self.process = self.process, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop within %.0f s; killing it", grace_s)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.info("tritonserver exited with code %s", proc.returncode)
        return proc.returncode

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m export.triton_server --model-repository DIR``: serve until Ctrl-C / SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", default=str(REPO_ROOT / "model_repository"))
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--host", default="127.0.0.1", help="where clients reach it")
    parser.add_argument("--bind", default="127.0.0.1",
                        help="interface Triton's HTTP, gRPC and metrics endpoints listen on (0.0.0.0: all; no auth)")
    parser.add_argument("--env", default=None, help=f"Triton environment (default ${ENV_VAR} or .venv-triton)")
    parser.add_argument("--log-file", default=None)
    parser.add_argument("--prepare-only", action="store_true", help="only install the python-backend stub")
    args = parser.parse_args(argv)
    # Its own logging set-up: `make triton-env` runs this file as a script in .venv-triton, where the
    # project's packages (salf.cli, the salfctl convention) are not importable. Under salfctl the
    # root logger already has its handler and this call does nothing.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.prepare_only:
            prepare_backends(find_install(args.env))
            return 0
        server = TritonServer(args.model_repository, log_path=args.log_file, env=args.env, http_port=args.http_port,
                              grpc_port=args.grpc_port, metrics_port=args.metrics_port, host=args.host,
                              bind=args.bind)
        server.start()
    except TritonError as exc:
        log.error("%s", exc)
        return 1
    print(f"Triton ready: grpc {server.grpc_url}  http {server.http_url}  metrics {server.metrics_url}  "
          f"log {server.log_path}", flush=True)
    stop = {"now": False}

    def _stop(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stop["now"] and server.alive:
        time.sleep(0.5)
    code = server.stop()
    return 0 if stop["now"] else (code or 1)


if __name__ == "__main__":
    sys.exit(main())
