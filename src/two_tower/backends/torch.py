"""PyTorch: inference run eagerly under `torch.no_grad()`.

Keras on torch runs its own predict steps eagerly unless `jit_compile=True`, and
`torch.compile` costs seconds per new shape, more than a search saves here. Eager
calls read the variables live, and grad mode is thread-local, so concurrent
calls need no lock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import torch


def compile_inference(
    function: Callable[[Any], Any], variables: Callable[[], Sequence[keras.Variable]]
) -> Callable[[Any], Any]:
    """`function` run under `torch.no_grad()`, so no autograd graph is kept.

    Args:
        function: maps a structure of arrays to a structure of tensors.
        variables: unused: eager calls read the variables live.

    Returns:
        A thread-safe callable with the same inputs and outputs as `function`.
    """
    del variables

    def run(inputs: Any) -> Any:
        with torch.no_grad():
            return function(inputs)

    return run
