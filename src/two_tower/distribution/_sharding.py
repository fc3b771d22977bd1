"""Backend-free glue to `keras.distribution` (implemented by Keras for JAX only).

A distribution set on TensorFlow or torch is refused (`check_supported`) wherever
the library reads it: fitting, evaluating, predicting, building a tower, indexing.

A `ModelParallel` distribution shards a variable by the `LayoutMap` entry its path
matches (`two_tower.distribution.layout_map` shards every `embeddings` table by
rows), and JAX refuses a table whose rows do not divide by the model axis. The
library's towers therefore build their tables with rows rounded up to that
axis (`pad_tables`): the extra rows start at zero, no id reaches them (the towers
check ids against their `vocabulary_size`), and no catalogue holds them, so
results are unchanged. The padded row count is recorded in the tower's config,
so a saved model reloads with the same shapes, on one device or many.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import keras
import numpy as np
from keras import ops

from two_tower.types import Tensor


def active() -> Any:
    """The `keras.distribution` distribution in effect, or None.

    Raises:
        ValueError: when one is set on TensorFlow or torch, where Keras does not
            implement it: the variables and batches would stay on one device
            without a word (see `check_supported`).
    """
    distribution = keras.distribution.distribution()
    if distribution is not None:
        check_supported(f"keras.distribution.set_distribution({type(distribution).__name__})")
    return distribution


def check_supported(what: str) -> None:
    """Raises unless Keras implements `keras.distribution` on this backend (JAX only).

    Keras 3 accepts a distribution on every backend, but only its JAX backend
    reads it: on TensorFlow variables take no layout and batches are not split
    (its `keras.distribution` code is an unfinished DTensor prototype), and on
    torch Keras has no distribution code at all. Training, evaluating, building
    a tower or indexing under one would run on one device.

    Raises:
        ValueError: naming `what` and the backend, and what to use instead.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        return
    instead = {
        "tensorflow": "On TensorFlow use tf.distribute (e.g. MirroredStrategy) for data "
        "parallel training; tables cannot be sharded by rows there.",
        "torch": "On torch two_tower trains on one process and device.",
    }.get(backend, "")
    raise ValueError(
        f"{what} needs the JAX backend: Keras implements keras.distribution on JAX only, "
        f"and on {backend} it would leave every variable and batch on one device without "
        f"a word. {instead} Run with KERAS_BACKEND=jax to shard, or call "
        "keras.distribution.set_distribution(None) to run on one device "
        "(see docs/distributed.md)."
    )


def data_axis_size() -> int:
    """Devices along the batch axis of the active distribution (1 without one)."""
    distribution = active()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    return int(mesh.shape[mesh.axis_names.index(distribution.batch_dim_name)])


def model_axis_size() -> int:
    """Devices along the non-batch mesh axes of an active `ModelParallel` (else 1)."""
    distribution = active()
    if not isinstance(distribution, keras.distribution.ModelParallel):
        return 1
    mesh = distribution.device_mesh
    sizes = [
        size
        for name, size in zip(mesh.axis_names, mesh.shape, strict=True)
        if name != distribution.batch_dim_name
    ]
    return int(math.prod(sizes))


def check_batches(what: str, rows: int, batch_size: int) -> None:
    """Raises before `fit`/`evaluate` when a batch does not divide by the data axis.

    On JAX, Keras splits each global batch over the distribution's batch axis,
    and a batch that does not divide fails inside JAX with an `IndivisibleError`
    about array shardings (keras issue 21167). The last batch holds
    `rows % batch_size` rows when that is not zero.

    Raises:
        ValueError: naming the batch size (or the last batch's rows) and the
            number of devices on the batch axis.
    """
    devices = data_axis_size()
    if devices == 1:
        return
    last = rows % batch_size
    for size, name in ((batch_size, "the batch size"), (last, "the last batch")):
        if size and size % devices:
            raise ValueError(
                f"{what}: {name} ({size} rows; {rows} rows in batches of {batch_size}) does "
                f"not divide by the {devices} devices of the distribution's batch axis, "
                "which each take an equal share. Choose a batch size that is a multiple of "
                f"{devices}, and drop or pad rows so the last batch divides too (e.g. keep "
                f"{rows - last} rows)."
            )


class _ZeroPadded:
    """An initializer drawing the first `rows` rows as `base` would, then zeros."""

    def __init__(self, base: Any, rows: int) -> None:
        self.base = keras.initializers.get(base)
        self.rows = rows

    def __call__(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        real = self.base((self.rows, *shape[1:]), dtype=dtype)
        padding = ops.zeros((shape[0] - self.rows, *shape[1:]), dtype=real.dtype)
        return ops.concatenate([real, padding], axis=0)


def pad_tables(
    tables: Mapping[str, keras.layers.Layer], recorded: Mapping[str, int] | None
) -> dict[str, int] | None:
    """Gives each unbuilt table (by layer name) its padded row count before it builds.

    Args:
        tables: layer name -> `keras.layers.Embedding` or `SparseEmbedding`,
            whose `input_dim` is the tower's vocabulary size for it.
        recorded: rows recorded by an earlier build (the tower's config), or None.

    Returns:
        layer name -> rows, for the tables given more rows than their vocabulary;
        None when there are none.
    """
    padded: dict[str, int] = {}
    multiple = model_axis_size()
    for name, layer in tables.items():
        if layer.built:
            continue
        vocabulary = layer.input_dim
        rows = max((recorded or {}).get(name, vocabulary), vocabulary)
        rows = -(-rows // multiple) * multiple
        if rows != vocabulary:
            layer.input_dim = rows
            layer.embeddings_initializer = _ZeroPadded(layer.embeddings_initializer, vocabulary)
            padded[name] = rows
    return padded or None


def check_shardable(layers: list[keras.layers.Layer]) -> None:
    """Raises a clear error for a table a `ModelParallel` cannot row-shard.

    JAX's own error (`IndivisibleError`) names the array's shape, not the
    variable. Called before the towers build, on the towers: any layer inside
    them with an `input_dim` (Keras' `Embedding`, `SparseEmbedding`, a user's
    own) whose row count does not divide by the model axis. Layers marked
    `pads_tables` (the library's towers) are skipped: they pad their tables.

    Raises:
        ValueError: naming the layer, its rows and the axis size.
    """
    multiple = model_axis_size()
    if multiple == 1:
        return
    for layer in layers:
        if getattr(layer, "pads_tables", False):
            continue  # a library tower: pads its own tables
        rows = getattr(layer, "input_dim", None)
        if not layer.built and isinstance(rows, int) and rows % multiple:
            raise ValueError(
                f"The table of layer {layer.name!r} ({type(layer).__name__}) has {rows} "
                f"rows, which do not divide by the {multiple} devices of the ModelParallel "
                "model axis, so it cannot be sharded by rows. Give it "
                f"{-(-rows // multiple) * multiple} rows (ids stay below the real count), "
                "or use two_tower.IdEmbeddingTower or FeatureTower, which pad their "
                "tables themselves."
            )
        check_shardable(layer._flatten_layers(include_self=False, recursive=False))  # noqa: SLF001


class ShardedCatalogue(NamedTuple):
    """A catalogue cut into chunks of `shards × width` rows, spread over devices.

    Chunk `t` holds positions `t × shards × width` onwards (the last is padded
    with zero rows); device `s` of the mesh (in row-major mesh order) holds its
    rows `s × width .. (s + 1) × width - 1`, as a `[*mesh shape, width, dim]`
    array laid out over every mesh axis.
    """

    chunks: tuple[Tensor, ...]
    shards: int  # devices
    width: int  # rows of each chunk on each device
    mesh: Any  # the keras.distribution.DeviceMesh


def shard_catalogue(embeddings: Any, chunk_size: int, block: int) -> ShardedCatalogue | None:
    """The catalogue spread by rows over every device of the active distribution.

    Each device gets `1 / devices` of the rows, in chunks of at most
    `chunk_size` rows (a multiple of `block`), so that it scores and ranks its
    own candidates; `jax.device_put` sends each device only its part. None
    when no distribution (or a one-device mesh) is active.

    Args:
        embeddings: `[candidates, dim]` in the index's dtype: an array, or
            anything with `shape` whose row slices are arrays (a `ChunkStore`).
        chunk_size: most rows per device per search step.
        block: the per-device width is a multiple of this.
    """
    distribution = active()
    if distribution is None:
        return None
    mesh = distribution.device_mesh
    shape = tuple(int(size) for size in mesh.shape)
    shards = math.prod(shape)
    if shards == 1:
        return None
    num_rows, dim = embeddings.shape
    per_device = -(-num_rows // shards)
    steps = -(-per_device // chunk_size)
    rows_per_step = -(-per_device // steps)
    width = -(-rows_per_step // block) * block
    layout = keras.distribution.TensorLayout((*mesh.axis_names, None, None), mesh)
    chunks = []
    for start in range(0, num_rows, shards * width):
        chunk = embeddings[start : start + shards * width]
        if len(chunk) < shards * width:
            padding = np.zeros((shards * width - len(chunk), dim), chunk.dtype)
            chunk = np.concatenate([chunk, padding])
        chunk = chunk.reshape(*shape, width, dim)
        chunks.append(keras.distribution.distribute_tensor(chunk, layout))
    return ShardedCatalogue(tuple(chunks), shards, width, mesh)
