"""Model versions: building the backend and :class:`~serving.service.Gateway` for one version of the
model repository, and finding a newer (or rolled-back) version that is ready to be swapped in. The swap
itself, and what calls in flight keep, is :meth:`serving.server.GatewayServer.switch_version`'s.
"""
from __future__ import annotations

import logging

from salf.contract.repository import latest_version, load_model_spec

from .backends import Backend, EmbeddedBackend, TritonBackend
from .cache import TTLCache
from .config import ServeConfig
from .metrics import GatewayMetrics
from .service import CachedMaps, Gateway

log = logging.getLogger(__name__)


class ModelVersions:
    """Makes the serving objects of a model version; remembers versions that cannot be served so the
    repository poll does not retry them every tick."""

    def __init__(self, config: ServeConfig, metrics: GatewayMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self._refused_versions: set[int] = set()
        from .ids import ExplanationIds

        self.ids = ExplanationIds.from_env(config.id_key)  # one key for every version (the version is hashed)
        log.info("explanation ids: %s", "keyed by the deployment's key (shared across replicas)" if self.ids.shared
                 else "random per-process key (set --id-key or SALF_ID_KEY to share ids across replicas)")
        self.store = self.store_health = None
        if config.cache != "local":
            from .store import RedisStore, StoreHealth

            if not self.ids.shared:
                log.warning("--cache %s without --id-key/SALF_ID_KEY: no other replica computes this one's ids, so "
                            "the store is shared by nobody", config.cache)
            self.store = RedisStore(config.cache, config.cache_ttl_s)
            self.store_health = StoreHealth(config.cache, metrics)
            log.info("explanation store: %s (local cache first)", config.cache)

    def make_gateway(self, spec, backend: Backend) -> Gateway:
        """A :class:`Gateway` for one model version, with a cache of its own (an explanation_id belongs to
        the version that made it)."""
        c = self.config
        cache = TTLCache(c.cache_size, c.cache_ttl_s, on_hit=self.metrics.cache_hits.inc,
                         on_miss=self.metrics.cache_misses.inc, max_bytes=c.cache_mb * 1024 * 1024,
                         size_of=CachedMaps.nbytes)
        self.metrics.model_info.info({
            "backend": backend.name, "backend_target": backend.target, "flavour": spec.flavour,
            "version": str(spec.version), "concepts": str(spec.num_concepts), "classes": str(spec.num_classes),
            "grid": f"{spec.grid[0]}x{spec.grid[1]}", "input_size": f"{spec.input_size[0]}x{spec.input_size[1]}",
            "pooling": spec.pooling, "bundle_sha256": spec.bundle_sha256, "maps_dtype": spec.maps_dtype})
        from .drift import DriftTracker

        from salf.contract.drift import tracked_concepts

        tracker = DriftTracker(spec.concepts, spec.concept_hist, c.drift_window, c.drift_top,
                               tracked=tracked_concepts(spec.weight, c.drift_tracked),
                               metrics=self.metrics) if c.drift_window else None
        if self.store is not None:
            from .store import TieredCache

            cache = TieredCache(cache, self.store, self.store_health)
        return Gateway(spec, backend, cache, c.limits, tracker, self.metrics, self.ids)

    def make_backend(self, spec) -> Backend:
        observe = self.metrics.observe_backend
        if self.config.triton_url:
            return TritonBackend(spec, self.config.triton_url, observe=observe)
        return EmbeddedBackend(spec, device=self.config.device, observe=observe)

    def next_ready(self, current: int) -> tuple[object, Backend] | None:
        """The spec of the repository's latest version and its backend, if that version is not ``current`` and its
        backend is ready (Triton loads it on its own); None otherwise. A version whose spec or backend
        fails is refused for good (logged once)."""
        latest = latest_version(self.config.model_repository)
        if latest is None or latest == current or latest in self._refused_versions:
            return None
        try:
            spec = load_model_spec(self.config.model_repository, latest)
            backend = self.make_backend(spec)
        except Exception as exc:
            self._refused_versions.add(latest)
            log.error("model version %d in %s cannot be served (staying on %d): %s", latest,
                      self.config.model_repository, current, exc)
            return None
        if not backend.ready(timeout_s=2.0):
            log.info("model version %d is not ready on the %s backend yet; serving %d meanwhile", latest,
                     backend.name, current)
            backend.close()
            return None
        return spec, backend
