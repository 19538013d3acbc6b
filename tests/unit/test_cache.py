"""serving/cache.py: bounded LRU with a time-to-live."""
import threading

import pytest

from serving.cache import TTLCache


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_lru_evicts_least_recently_used():
    cache = TTLCache(2, 60, clock=Clock())
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now more recent than "b"
    cache.put("c", 3)
    assert cache.get("b") is None
    assert cache.get("a") == 1 and cache.get("c") == 3
    assert len(cache) == 2


def test_entries_expire_after_ttl():
    clock = Clock()
    cache = TTLCache(10, 5.0, clock=clock)
    cache.put("a", 1)
    clock.now = 4.9
    assert cache.get("a") == 1
    clock.now = 5.0
    assert cache.get("a") is None
    assert len(cache) == 0


def test_put_replaces_and_renews():
    clock = Clock()
    cache = TTLCache(10, 5.0, clock=clock)
    cache.put("a", 1)
    clock.now = 4.0
    cache.put("a", 2)
    clock.now = 8.0
    assert cache.get("a") == 2


def test_hit_and_miss_callbacks():
    counts = {"hit": 0, "miss": 0}
    cache = TTLCache(1, 60, on_hit=lambda: counts.__setitem__("hit", counts["hit"] + 1),
                     on_miss=lambda: counts.__setitem__("miss", counts["miss"] + 1))
    cache.put("a", 1)
    cache.get("a")
    cache.get("b")
    cache.get("b")
    assert counts == {"hit": 1, "miss": 2}


def test_bounded_under_concurrent_use():
    cache = TTLCache(50, 60)

    def work(offset):
        for i in range(500):
            cache.put((offset, i), i)
            cache.get((offset, i - 1))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 50


@pytest.mark.parametrize("size,ttl", [(0, 1), (1, 0)])
def test_bad_parameters(size, ttl):
    with pytest.raises(ValueError):
        TTLCache(size, ttl)


def test_byte_bound_evicts_least_recently_used_and_keeps_the_count():
    cache = TTLCache(100, 60.0, max_bytes=10, size_of=len)
    for key in "abc":
        cache.put(key, "xxxx")  # 4 bytes each: the third pushes the total to 12
    assert cache.get("a") is None and cache.get("b") == "xxxx" and cache.get("c") == "xxxx"
    assert cache.bytes == 8
    cache.put("b", "yyyyyy")  # replacing counts the new size only
    assert cache.bytes == 10 and len(cache) == 2
    cache.put("big", "z" * 50)  # larger than the bound alone: kept (the newest), everything else goes
    assert len(cache) == 1 and cache.get("big") is not None and cache.bytes == 50


def test_byte_bound_counts_expired_and_evicted_entries():
    now = [0.0]
    cache = TTLCache(2, 5.0, clock=lambda: now[0], max_bytes=100, size_of=len)
    cache.put("a", "1234")
    cache.put("b", "12")
    cache.put("c", "123")  # evicts "a" by count
    assert cache.bytes == 5
    now[0] = 10.0
    assert len(cache) == 0 and cache.bytes == 0  # expired


def test_byte_bound_needs_size_of():
    with pytest.raises(ValueError):
        TTLCache(10, 1.0, max_bytes=100)


def test_expiry_follows_insertion_not_use_order():
    """A get makes an entry recently used but does not renew it: it still expires first, and a re-put
    renews it (expiry looks only at the oldest insertions, so these orders must be kept apart)."""
    clock = Clock()
    cache = TTLCache(10, 5.0, clock=clock)
    cache.put("a", 1)
    clock.now = 1.0
    cache.put("b", 2)
    cache.put("c", 3)
    assert cache.get("a") == 1  # a is now the most recently used, and still the first to expire
    clock.now = 5.5
    cache.put("c", 30)  # renewed: expires at 10.5
    assert cache.get("a") is None and cache.get("b") == 2 and len(cache) == 2
    clock.now = 6.0
    assert len(cache) == 1 and cache.get("b") is None and cache.get("c") == 30
    clock.now = 10.5
    assert len(cache) == 0 and cache.bytes == 0
