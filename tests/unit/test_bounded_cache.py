"""The process caches (parsed policies, site rules, job-shape verdicts) stay under their ceiling by
emptying themselves, and never drop an entry that is only being replaced."""

from __future__ import annotations

from marketplace.config.bounded import BoundedCache


def test_entries_under_the_limit_are_all_kept() -> None:
    cache: BoundedCache[str, int] = BoundedCache(limit=3)
    for n, key in enumerate("abc"):
        assert cache.put(key, n) == n
    assert cache == {"a": 0, "b": 1, "c": 2}


def test_a_new_key_at_the_limit_empties_the_cache_first() -> None:
    cache: BoundedCache[str, int] = BoundedCache(limit=2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("c", 3)
    assert cache == {"c": 3}


def test_replacing_a_key_at_the_limit_keeps_the_others() -> None:
    cache: BoundedCache[str, int] = BoundedCache(limit=2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 10)
    assert cache == {"a": 10, "b": 2}
