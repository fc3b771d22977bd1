"""Hooks of `two_tower.backends` for backends with nothing to do in them.

Shared by the backend modules that re-export them (see `two_tower.backends`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def replica_loss(loss: Any, rows: Any, batch_rows: Any = None) -> Any:
    """`loss` unchanged: Keras on this backend has no per-replica step to scale for."""
    del rows, batch_rows
    return loss


def global_negatives(
    candidate_embeddings: Any, candidate_ids: Any, log_q: Any, candidate_mask: Any
) -> tuple[Any, Any, Any, Any, None]:
    """The arguments unchanged: this backend's step already sees the global batch."""
    return candidate_embeddings, candidate_ids, log_q, candidate_mask, None


def all_replicas(values: Any) -> Any:
    """`values` unchanged: this backend's step already sees the global batch."""
    return values


def check_replicas(what: str, x: Any) -> None:
    """Nothing to refuse: this backend splits every input of `fit` itself."""
    del what, x


def map_slices(function: Callable[[Any], Any], xs: Any) -> Any:
    """`keras.ops.map(function, xs)`: compiled into one loop by this backend."""
    from keras import ops

    return ops.map(function, xs)


def map_devices(function: Callable[[Any], Any], rows: Any, mesh: Any) -> Any:
    """`function(rows)`: there is no device mesh to split the rows over on this backend."""
    del mesh
    return function(rows)


def loop_callbacks() -> list[Any]:
    """No callbacks to add to `fit` and `evaluate` on this backend."""
    return []


def array_train_function(model: Any, columns: Any) -> None:
    """None: `fit` on arrays takes Keras' own path on this backend."""
    del model, columns


def variables_replaced(layer: Any) -> None:
    """Nothing: Keras reads the layers' variables as they are."""
    del layer


def step_counter(steps: int) -> Any:
    """Never called where `array_train_function` gives None."""
    raise NotImplementedError(f"no step counter on this backend (steps={steps})")
