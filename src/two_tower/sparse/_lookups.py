"""What a `SparseEmbedding` lookup needs at call time: its id checks and the recorder.

Kept apart from `_sparse_training` (the update step, which needs the layer's type)
so that the layer and its training import in one direction only.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from two_tower.types import Tensor

if TYPE_CHECKING:
    from two_tower.sparse.sparse_embedding import SparseEmbedding


ID_RANGE_MARKER = "takes ids in [0, "
"""Part of every out-of-range id message, also of the in-graph (TensorFlow) check's."""


def id_range_error(layer_name: str, rows: int, low: Any, high: Any) -> ValueError:
    """The error for ids outside `[0, rows)` of the `SparseEmbedding` named `layer_name`."""
    return ValueError(
        f"SparseEmbedding {layer_name!r} {ID_RANGE_MARKER}{rows}) (its input_dim). Received "
        f"ids from {low} to {high}. Map ids to indices first (e.g. with two_tower.Vocabulary), "
        "or give the table more rows."
    )


def check_host_ids(ids: np.ndarray, layer_name: str, rows: int) -> None:
    """Raises unless the concrete `ids` are integers (or integer-valued floats) in `[0, rows)`.

    The check `SparseEmbedding` makes wherever its ids have values (eager calls on
    every backend, each torch step), so every backend raises the same error.
    """
    if ids.size == 0:
        return
    if ids.dtype.kind == "f":
        finite = np.isfinite(ids)
        whole = finite & (ids == np.round(np.where(finite, ids, 0)))
        if not np.all(whole):
            value = ids.reshape(-1)[int(np.flatnonzero(~whole.reshape(-1))[0])].item()
            raise ValueError(
                f"SparseEmbedding {layer_name!r} takes integer ids. Received {ids.dtype} ids "
                f"with non-integer values, e.g. {value!r}. Integer-valued floats (3.0) are "
                "accepted."
            )
    low, high = ids.min().item(), ids.max().item()
    if low < 0 or high >= rows:
        if isinstance(low, float):
            low, high = int(low), int(high)
        raise id_range_error(layer_name, rows, low, high)


class Recorder(Protocol):
    """What a backend's recorder provides to `SparseEmbedding.call`."""

    def lookup(self, layer: SparseEmbedding, ids: Tensor) -> Tensor:
        """The rows of `layer` at `ids`, differentiable by the rows themselves."""
        ...


_state = threading.local()


def active_recorder() -> Recorder | None:
    """The recorder of the training step running in this thread, if any."""
    return getattr(_state, "recorder", None)


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[None]:
    """Makes `recorder` answer this thread's `SparseEmbedding` lookups."""
    previous = active_recorder()
    _state.recorder = recorder
    try:
        yield
    finally:
        _state.recorder = previous
