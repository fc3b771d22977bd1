"""Deserializes a saved `TwoTowerRetrieval` compile config on the backend loading it."""

from __future__ import annotations

import warnings
from typing import Any

import keras

from two_tower.backends import backend_module


def loadable_compile_config(config: dict[str, Any]) -> dict[str, Any]:
    """A saved `TwoTowerRetrieval` compile config, deserialized for this backend.

    Used by `TwoTowerRetrieval.compile_from_config`; warns about what it changes.
    """
    optimizer = config.get("optimizer")
    if isinstance(optimizer, dict) and str(optimizer.get("module", "")).startswith(
        "keras.src.backend."
    ):
        # Keras on torch swaps `keras.optimizers.Adam` (and others) for a class of
        # its own torch backend, and saves that class's module. Loaded on JAX or
        # TensorFlow, that class runs torch ops on their arrays; resolve the
        # public optimizer of the same name instead.
        config = {**config, "optimizer": {**optimizer, "module": "keras.optimizers"}}
    config = keras.saving.deserialize_keras_object(config)
    metric_names = config.pop("retrieval_metric_names", None)
    if metric_names:
        warnings.warn(
            f"This model was compiled with FactorizedTopK metrics {metric_names}, which "
            "are not saved with it (their exclusion tables can be as large as the "
            "training data). It is compiled without them; to evaluate, compile again "
            "with the metrics.",
            stacklevel=4,
        )
    steps = config.get("steps_per_execution", 1)
    limit = backend_module().max_steps_per_execution
    if limit is not None and steps > limit:
        # Saved on JAX or TensorFlow with defaults.steps_per_execution() (16);
        # Keras on torch rejects anything but 1, which would make the file
        # unloadable here. Training semantics do not depend on it.
        warnings.warn(
            f"This model was compiled with steps_per_execution={steps}, which Keras "
            f"does not support on {keras.backend.backend()}; it is compiled with "
            f"steps_per_execution={limit} here (two_tower.defaults.steps_per_execution() "
            f"gives {limit} on {keras.backend.backend()}).",
            stacklevel=4,
        )
        config["steps_per_execution"] = limit
    return config
