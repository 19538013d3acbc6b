"""``ServeConfig``: every option of ``salfctl serve`` and the gRPC channel options they turn into."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .service import Limits


@dataclass
class ServeConfig:
    """``salfctl serve`` options (docs/operations.md lists each with its flag). ``port=0`` and
    ``metrics_port=0`` pick free ports; ``metrics_port=None`` disables metrics. ``tls_cert``/``tls_key``
    (PEM) enable TLS; ``token`` enables bearer auth."""
    model_repository: Path
    triton_url: str | None = None
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int | None = 9464
    metrics_host: str = "127.0.0.1"
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    cache_size: int = 1024
    cache_ttl_s: float = 900.0
    cache_mb: int = 256  # and at most this many MB of maps (paper size: ~280 explanations of 930 KB)
    max_in_flight: int = 64
    stream_idle_s: float = 10.0
    stream_window: int = 8  # items of one Stream call worked on at once, unless its first message asks (<= max_in_flight)
    max_streams_per_connection: int = 100
    max_connection_idle_s: float = 300.0
    max_connection_age_s: float = 1800.0
    max_connection_age_grace_s: float = 30.0
    limits: Limits = Limits()
    device: str = "cpu"
    max_message_mb: int = 64
    readiness_interval_s: float = 5.0
    poll_interval_s: float = 5.0
    drift_window: int = 256  # requests in the concept-drift window (0: no drift tracking)
    drift_top: int = 5  # drifting concepts exported
    drift_tracked: int = 16  # concepts whose z-bin counts are exported (add up across replicas)
    drift_interval_s: float = 2.0  # how often the repository is checked for a new model version (0: never)
    # NumPy's BLAS threads for the explanation math (None: leave the process's setting). One: OpenBLAS's
    # pool spins after each product, and on two cores that halved the next forward's speed (paper size,
    # Predict right after an Explain: 92 ms with the default pool, 61 ms with one thread, measured).
    blas_threads: int | None = 1
    # The key of content-addressed explanation ids (serving/ids.py): every replica behind one balancer must
    # share it. None: $SALF_ID_KEY, else a random key per process (ids stable within one replica only).
    id_key: str | None = None
    # Where explanations live: "local" (this process only) or redis://HOST:PORT/DB, shared by the replicas
    # (serving/store.py), with the local cache as the first level.
    cache: str = "local"
    replica_name: str | None = None  # x-salf-replica of every answer; None: HOSTNAME:PORT

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.stream_idle_s <= 0:
            raise ValueError(f"stream_idle_s must be > 0, got {self.stream_idle_s}")
        if self.stream_window < 1:
            raise ValueError(f"stream_window must be >= 1, got {self.stream_window}")
        if self.cache != "local":
            from .store import check_url

            check_url(self.cache)

    def grpc_options(self) -> list[tuple[str, int]]:
        size = self.max_message_mb * 1024 * 1024
        ms = lambda seconds: int(seconds * 1000)
        return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
                # a second gateway on the same port must fail, not share it silently
                ("grpc.so_reuseport", 0),
                ("grpc.max_concurrent_streams", int(self.max_streams_per_connection)),
                ("grpc.max_connection_idle_ms", ms(self.max_connection_idle_s)),
                ("grpc.max_connection_age_ms", ms(self.max_connection_age_s)),
                ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_s))]
