"""`CompiledCache`: compiled functions by key, bounded, built once across threads."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

Compiled = TypeVar("Compiled")


class CompiledCache(Generic[Compiled]):
    """Compiled functions (or steps) by a key the caller chooses; the oldest goes first.

    Serving's tower functions, `BruteForceIndex`'s search steps and JAX's
    `jax.jit` functions are each compiled once per key (a function, a `k`, a
    list of variables...) and kept here. Concurrent first calls with one key
    compile once: a miss takes the lock and looks again before building. A hit
    takes no lock: reading a dict is atomic in CPython, and every write (and
    the eviction's iteration) happens under the lock.

    Args:
        max_size: most entries kept; building one more evicts the oldest
            (`max_size=1` keeps only the latest, e.g. when a new key means the
            old entry is stale).

    Example:

        >>> cache = CompiledCache(max_size=2)
        >>> cache.get("double", lambda: lambda x: 2 * x)(3)
        6
        >>> cache.get("double", lambda: None)(4)  # built once per key
        8
    """

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"`max_size` must be at least 1. Received: {max_size}")
        self.max_size = max_size
        self._entries: dict[Hashable, Compiled] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], Compiled]) -> Compiled:
        """The entry for `key`, built with `build()` (under the lock) if missing.

        Args:
            key: names the entry; hashable.
            build: makes the entry; called at most once per key while it stays
                cached, even from concurrent calls.

        Returns:
            The cached or newly built entry.
        """
        entry = self._entries.get(key)
        if entry is None:
            with self._lock:
                entry = self._entries.get(key)
                if entry is None:
                    if len(self._entries) >= self.max_size:
                        self._entries.pop(next(iter(self._entries)))
                    entry = self._entries[key] = build()
        return entry
