"""TensorFlow: inference compiled with `tf.function`.

A `tf.function` reads the variables it captures at each call (never a copy taken
at trace time), and TensorFlow serialises its own tracing, so concurrent calls
need no lock. XLA is not requested: Keras itself turns it off on CPU-only
machines (its `jit_compile="auto"`), where it is slower for these steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf


def compile_inference(
    function: Callable[[Any], Any], variables: Callable[[], Sequence[keras.Variable]]
) -> Callable[[Any], Any]:
    """`function` compiled with `tf.function` (shapes relaxed as Keras' own steps do).

    Args:
        function: maps a structure of arrays to a structure of tensors.
        variables: unused: a `tf.function` reads captured variables live.

    Returns:
        A thread-safe callable with the same inputs and outputs as `function`.
    """
    del variables
    return tf.function(function, reduce_retracing=True)


def serving_slot() -> contextlib.AbstractContextManager[None]:
    """Nothing to wait for: concurrent serving calls run at once (see the module)."""
    return contextlib.nullcontext()


def keep_state_on_error(model: keras.Model) -> contextlib.AbstractContextManager[None]:
    """Nothing to keep: this backend's trainer leaves the variables in place on errors."""
    del model
    return contextlib.nullcontext()
