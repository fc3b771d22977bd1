"""Makes mypy check each backend module against `BackendModule`; never imported."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from two_tower.backends import jax, tensorflow, torch
    from two_tower.backends._protocol import BackendModule

    JAX: BackendModule = jax
    TENSORFLOW: BackendModule = tensorflow
    TORCH: BackendModule = torch
