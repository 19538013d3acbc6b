"""The shared explanation store (issue 23, item 3): explanation maps in Redis behind the cache's interface.

``salfctl serve --cache redis://HOST:PORT/DB`` makes each version's cache a :class:`TieredCache`: the
in-process :class:`~serving.cache.TTLCache` first, Redis second. An Explain writes both; a follow-up that
misses locally (it reached another replica, or this one restarted) reads Redis and keeps the entry
locally. Keys are the content-addressed explanation ids (serving/ids.py), so every replica sharing
``--id-key`` finds what any of them stored.

Bounds: each entry carries the cache's TTL (``--cache-ttl``); the server's memory is bounded by Redis
itself (``maxmemory`` with ``maxmemory-policy allkeys-lru``: deploy/compose.yaml, deploy/k8s/redis.yaml).

Outages never fail a request: a Redis error or timeout (``timeout_s``, 0.5 s) counts in
``salf_gateway_store_errors_total{op}``, sets ``salf_gateway_store_up`` to 0, logs one warning, and the
store is skipped for ``retry_after_s`` (1 s) before it is tried again (so an outage costs at most one
timeout per second, not one per request); the gateway serves from its local cache meanwhile, and logs
when the store is back.

Writes are synchronous (an Explain returns after its maps are in Redis, so a follow-up on any replica
finds them): about 1-2 ms for a paper-size entry (930 KB) on a local network.
"""
from __future__ import annotations

import json
import logging
import struct
import threading
import time
from typing import Callable

import numpy as np

from .cache import TTLCache

log = logging.getLogger(__name__)

_MAGIC = b"SALF-MAPS1"
_PREFIX = "salf:explanation:"


class StoreError(RuntimeError):
    """The store failed (connection, timeout)."""


class CorruptEntry(StoreError):
    """An entry's bytes are not an explanation (written by something else): a miss, not an outage."""


def encode_entry(entry) -> bytes:
    """A :class:`~serving.service.CachedMaps` as bytes: magic, a JSON header (dtypes, shapes, image size),
    then the raw little-endian arrays."""
    arrays = [np.ascontiguousarray(a) for a in (entry.maps, entry.scores, entry.logits)]
    header = json.dumps({"size": list(entry.size),
                         "arrays": [[a.dtype.newbyteorder("<").str, list(a.shape)] for a in arrays]}).encode()
    return b"".join([_MAGIC, struct.pack("<I", len(header)), header,
                     *(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes() for a in arrays)])


def decode_entry(data: bytes):
    """The inverse of :func:`encode_entry`; :class:`StoreError` when the bytes are not such an entry."""
    from .service import CachedMaps

    try:
        if not data.startswith(_MAGIC):
            raise ValueError("no magic")
        (n,) = struct.unpack_from("<I", data, len(_MAGIC))
        start = len(_MAGIC) + 4
        header = json.loads(data[start:start + n])
        offset, arrays = start + n, []
        for dtype, shape in header["arrays"]:
            dt = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            if offset + count * dt.itemsize > len(data):
                raise ValueError("truncated")
            arrays.append(np.frombuffer(data, dt, count, offset).reshape(shape).astype(dt.newbyteorder("="), copy=True))
            offset += count * dt.itemsize
        if offset != len(data):
            raise ValueError("trailing bytes")
        h, w = header["size"]
        return CachedMaps(arrays[0], arrays[1], arrays[2], (int(h), int(w)))
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise CorruptEntry(f"corrupt explanation entry ({len(data)} bytes): {exc}") from exc


def check_url(url: str) -> str:
    """``url`` if it is a Redis URL the client accepts, else ValueError naming the problem."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"--cache {url!r}: expected 'local' or redis://HOST:PORT/DB (rediss:// for TLS, unix:// "
                         f"for a socket)")
    return url


class RedisStore:
    """Entries under ``salf:explanation:<id>`` with a TTL; every error is a :class:`StoreError`."""

    def __init__(self, url: str, ttl_s: float, timeout_s: float = 0.5) -> None:
        import redis

        self.url = check_url(url)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry_on_timeout=False)
        self._errors = (redis.exceptions.RedisError, OSError)

    def get(self, key: str):
        try:
            data = self._redis.get(_PREFIX + key)
        except self._errors as exc:
            raise StoreError(f"GET failed: {exc}") from exc
        return None if data is None else decode_entry(data)

    def put(self, key: str, entry) -> None:
        try:
            self._redis.set(_PREFIX + key, encode_entry(entry), px=self.ttl_ms)
        except self._errors as exc:
            raise StoreError(f"SET failed: {exc}") from exc

    def close(self) -> None:
        self._redis.close()


class StoreHealth:
    """Shared by every version's :class:`TieredCache`: whether the store is in use now, the metrics, and
    one log line per outage."""

    def __init__(self, url: str, metrics=None, retry_after_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.metrics = metrics
        self.retry_after_s = float(retry_after_s)
        self._clock = clock
        self._down_until = 0.0
        self._down = False
        self._lock = threading.Lock()
        if metrics is not None:
            metrics.store_up.set(1)
            for op in ("get", "put", "decode"):
                metrics.store_errors.labels(op)  # every series from the start, at 0

    def usable(self) -> bool:
        with self._lock:
            return not self._down or self._clock() >= self._down_until

    def failed(self, op: str, exc: Exception) -> None:
        if self.metrics is not None:
            self.metrics.store_errors.labels(op).inc()
            self.metrics.store_up.set(0)
        with self._lock:
            first = not self._down
            self._down, self._down_until = True, self._clock() + self.retry_after_s
        if first:
            log.warning("explanation store %s unavailable (%s): serving from the local cache, retrying every %g s",
                        self.url, exc, self.retry_after_s)

    def succeeded(self) -> None:
        with self._lock:
            was_down, self._down = self._down, False
        if was_down:
            if self.metrics is not None:
                self.metrics.store_up.set(1)
            log.info("explanation store %s is back", self.url)


class TieredCache:
    """The local :class:`TTLCache` first, the shared store second; the cache interface (get, put, len)."""

    def __init__(self, local: TTLCache, store: RedisStore, health: StoreHealth) -> None:
        self.local = local
        self.store = store
        self.health = health
        self.metrics = health.metrics

    def get(self, key):
        entry = self.local.get(key)
        if entry is not None or not self.health.usable():
            return entry
        try:
            entry = self.store.get(key)
        except CorruptEntry as exc:
            log.warning("explanation store entry %s ignored: %s", key, exc)
            if self.metrics is not None:
                self.metrics.store_errors.labels("decode").inc()
            return None
        except StoreError as exc:
            self.health.failed("get", exc)
            return None
        self.health.succeeded()
        if self.metrics is not None:
            (self.metrics.store_hits if entry is not None else self.metrics.store_misses).inc()
        if entry is not None:
            self.local.put(key, entry)
        return entry

    def put(self, key, value) -> None:
        self.local.put(key, value)
        if not self.health.usable():
            return
        try:
            self.store.put(key, value)
        except StoreError as exc:
            self.health.failed("put", exc)
            return
        self.health.succeeded()

    def __len__(self) -> int:
        return len(self.local)

    @property
    def bytes(self) -> int:
        return self.local.bytes
