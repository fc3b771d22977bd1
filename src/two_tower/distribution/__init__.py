"""Sharding two-tower models with `keras.distribution` (JAX).

Keras implements `keras.distribution` for JAX only (TensorFlow and torch accept
a distribution and ignore it, so two_tower refuses one there): on JAX, `fit` compiles one
step over global arrays, so the loss (and in-batch softmax) sees the whole
global batch on any mesh. `layout_map` gives the `LayoutMap` that a
`keras.distribution.ModelParallel` needs to shard every embedding table by rows;
see `docs/distributed.md` for the whole recipe, TensorFlow's `tf.distribute`
included.
"""

from __future__ import annotations

import keras

from two_tower.distribution import _sharding

TABLES = ".*embeddings"
"""The `LayoutMap` key of every table: Keras' `Embedding`, `SparseEmbedding`,
and the tables of `IdEmbeddingTower` and `FeatureTower` all name their variable
`embeddings`."""


def layout_map(
    device_mesh: keras.distribution.DeviceMesh, model_axis: str = "model"
) -> keras.distribution.LayoutMap:
    """A `LayoutMap` sharding every embedding table by rows over `model_axis`.

    Each device then holds `rows / devices` rows of each table (keras-hub's
    `get_layout_map` does the same for its token embeddings). Every other
    variable (Dense kernels, biases) stays replicated. The library's towers
    round their tables' rows up to the axis size; a plain
    `keras.layers.Embedding` whose rows do not divide by it is refused with an
    error naming it by `TwoTowerRetrieval.fit`, `evaluate` and `predict`.

    Args:
        device_mesh: a mesh with a batch axis and `model_axis`, e.g.
            `DeviceMesh((2, 4), ["batch", "model"], devices)`.
        model_axis: the mesh axis that tables are sharded over.

    Returns:
        A `keras.distribution.LayoutMap` for `ModelParallel(layout_map=...)`.

    Raises:
        ValueError: if `model_axis` is not an axis of `device_mesh`, or on
            TensorFlow and torch, where Keras does not implement
            `keras.distribution` (the tables would not be sharded).
        TypeError: if `device_mesh` is not a `keras.distribution.DeviceMesh`.

    Examples:
        >>> import keras
        >>> mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], ["cpu:0", "cpu:1"])
        >>> try:
        ...     axes = two_tower.distribution.layout_map(mesh)["user/embeddings"].axes
        ... except ValueError:  # TensorFlow and torch: keras.distribution is JAX's only
        ...     axes = None
        >>> axes == ("model", None) or keras.backend.backend() != "jax"
        True
    """
    _sharding.check_supported("two_tower.distribution.layout_map")
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise TypeError(
            "`device_mesh` must be a keras.distribution.DeviceMesh, e.g. "
            "DeviceMesh((2, 4), ['batch', 'model'], keras.distribution.list_devices()). "
            f"Received: device_mesh={device_mesh!r} ({type(device_mesh).__name__})"
        )
    if model_axis not in device_mesh.axis_names:
        raise ValueError(
            f"`model_axis` must be an axis of the device mesh, whose axes are "
            f"{list(device_mesh.axis_names)}. Received: model_axis={model_axis!r}"
        )
    layouts = keras.distribution.LayoutMap(device_mesh)
    layouts[TABLES] = (model_axis, None)
    return layouts


__all__ = ["TABLES", "layout_map"]
