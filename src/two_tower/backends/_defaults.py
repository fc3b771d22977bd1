"""Hooks of `two_tower.backends` for backends with nothing to do in them.

Shared by the backend modules that re-export them (see `two_tower.backends`).
"""

from __future__ import annotations

from typing import Any


def replica_loss(loss: Any, rows: Any) -> Any:
    """`loss` unchanged: Keras on this backend has no per-replica step to scale for."""
    del rows
    return loss


def global_negatives(
    candidate_embeddings: Any, candidate_ids: Any, log_q: Any
) -> tuple[Any, Any, Any, None]:
    """The arguments unchanged: this backend's step already sees the global batch."""
    return candidate_embeddings, candidate_ids, log_q, None


def check_replicas() -> None:
    """Nothing to refuse: this backend's distributed training is supported."""
