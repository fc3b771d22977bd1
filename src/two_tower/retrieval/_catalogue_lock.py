"""A readers-writer lock: many searches at once, or one change to the catalogue.

`BruteForceIndex.add`, `remove` and `update` change the catalogue's buffers in
place (O(rows changed), not a new copy of the catalogue), so a search must not
read them meanwhile. Searches hold the lock shared; a change holds it alone, and
a waiting change goes before searches that arrive after it (so a steady stream
of searches cannot starve it). A thread that already reads may read again
(e.g. `search` inside a model's serving call) without waiting.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class ReadWriteLock:
    """Shared reading, exclusive writing, writers first; reads re-entrant per thread."""

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._waiting_writers = 0
        self._local = threading.local()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._condition:
                while self._writing or self._waiting_writers:
                    self._condition.wait()
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._condition:
                    self._readers -= 1
                    if self._readers == 0:
                        self._condition.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        if getattr(self._local, "depth", 0):
            raise RuntimeError(
                "A change to the index was made while this thread reads it (e.g. from a "
                "callback inside `search`): it would wait for itself."
            )
        with self._condition:
            self._waiting_writers += 1
            try:
                while self._writing or self._readers:
                    self._condition.wait()
            finally:
                self._waiting_writers -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()
