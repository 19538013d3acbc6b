"""serving/store.py: the explanation store's entry format, and a tiered cache that degrades to the local
level when Redis cannot be reached (a real redis client against a port where nothing listens)."""
import logging

import numpy as np
import pytest

from serving.cache import TTLCache
from serving.metrics import GatewayMetrics
from serving.service import CachedMaps
from serving.store import CorruptEntry, RedisStore, StoreHealth, TieredCache, check_url, decode_entry, encode_entry
from tests.fixtures.gateway import free_port


def _entry(dtype=np.float16):
    rng = np.random.default_rng(0)
    return CachedMaps(rng.normal(size=(5, 3, 4)).astype(dtype), rng.normal(size=5).astype(np.float32),
                      rng.normal(size=7).astype(np.float32), (61, 83))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_entries_round_trip_bit_for_bit(dtype):
    e = _entry(dtype)
    back = decode_entry(encode_entry(e))
    assert back.size == (61, 83) and back.maps.dtype == dtype
    for a, b in ((e.maps, back.maps), (e.scores, back.scores), (e.logits, back.logits)):
        np.testing.assert_array_equal(a, b)
    assert back.maps.flags.writeable  # a copy, not a view of the received bytes
    assert len(encode_entry(e)) < e.nbytes() + 200


@pytest.mark.parametrize("data", [b"", b"GET /", encode_entry(_entry())[:-3], encode_entry(_entry()) + b"x"])
def test_foreign_or_truncated_bytes_are_a_corrupt_entry(data):
    with pytest.raises(CorruptEntry):
        decode_entry(data)


def test_cache_urls_are_checked():
    assert check_url("redis://10.0.0.5:6379/2") == "redis://10.0.0.5:6379/2"
    with pytest.raises(ValueError, match="expected 'local' or redis://"):
        check_url("memcached://x")
    from serving.config import ServeConfig

    with pytest.raises(ValueError, match="redis://HOST:PORT/DB"):
        ServeConfig(model_repository="x", cache="redis:/oops")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_an_unreachable_store_degrades_to_the_local_cache_and_is_retried_after_an_interval(caplog):
    metrics, clock = GatewayMetrics(), Clock()
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    health = StoreHealth(url, metrics, retry_after_s=1.0, clock=clock)
    cache = TieredCache(TTLCache(4, 60), RedisStore(url, 60, timeout_s=0.2), health)
    err = lambda op: metrics.registry.get_sample_value("salf_gateway_store_errors_total", {"op": op})
    assert err("get") == 0 and err("put") == 0  # the series exist from the start
    with caplog.at_level(logging.WARNING, logger="serving.store"):
        cache.put("a", _entry())  # local write succeeds, the store's fails
        assert cache.get("a") is not None  # the local level answers
        assert cache.get("b") is None  # skipped: the store is down for 1 s, no second timeout
    assert err("put") == 1 and err("get") == 0
    assert metrics.registry.get_sample_value("salf_gateway_store_up") == 0
    assert sum("unavailable" in r.message for r in caplog.records) == 1  # one line per outage
    clock.now += 1.5
    assert cache.get("b") is None and err("get") == 1  # tried again after the interval
    assert len(cache) == 1
