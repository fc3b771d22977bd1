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
import numpy as np
import tensorflow as tf

# Hooks with nothing to do on this backend (see two_tower.backends).
from two_tower.backends._defaults import check_replicas as check_replicas
from two_tower.backends._defaults import loop_callbacks as loop_callbacks
from two_tower.backends._defaults import map_devices as map_devices


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


def replica_loss(loss: Any, rows: Any) -> Any:
    """A replica's mean `loss` over its `rows`, scaled to its share of the global batch.

    Under a `tf.distribute` strategy Keras' TensorFlow trainer sums the replicas'
    gradients (and logs the loss times the number of replicas), so it expects
    `compute_loss` to return each replica's share of the global mean. Keras' own
    `Loss` objects divide by the number of replicas, which is exact only when
    every replica holds as many rows; a last partial batch (e.g. 53 rows on 2
    replicas: 27 and 26) then trains on a slightly different loss. Here the
    factor is `rows / global rows` (one all-reduce of a scalar), so the summed
    replica gradients are the single-device gradient for every batch. Without
    any scaling, `MirroredStrategy` on 2 replicas logged twice the loss and
    took steps twice too large.

    Keras logs the returned value times the number of replicas, weighted by the
    replica's rows. A term without gradient makes that the replica's own mean,
    so the logged loss is the global batch's mean as on one device, uneven last
    batch included (before: off by up to 3.8e-3 on 4 replicas).
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return loss
    rows = tf.cast(rows, loss.dtype)
    scaled = loss * rows / context.all_reduce(tf.distribute.ReduceOp.SUM, rows)
    logged = loss / context.num_replicas_in_sync  # what Keras multiplies back
    return scaled + tf.stop_gradient(logged - scaled)


def global_negatives(
    candidate_embeddings: Any, candidate_ids: Any, log_q: Any
) -> tuple[Any, Any, Any, Any]:
    """Each replica's batch candidates, gathered from every replica in sync.

    Under a `tf.distribute` strategy Keras' step runs once per replica on its
    share of the global batch, so in-batch negatives would come from that share
    only (TFRS has done so since it removed its cross-replica gather in 2021).
    Here the candidate embeddings, with their ids (accidental hits) and log
    sampling probabilities (logQ), are all-gathered in replica order, and the
    replica's positives are its own rows of the gathered batch: row i of replica
    r is column `offset_r + i`, where `offset_r` counts the rows of replicas
    before r (shares may differ by one row in a last partial batch).
    `all_gather`'s gradient sums every replica's gradient by the gathered rows
    and hands each replica its own slice, so together with `replica_loss` the
    summed replica gradients equal the single-device gradient of the global
    batch.

    Returns:
        `(candidate_embeddings, candidate_ids, log_q, positive_positions)`; the
        arguments unchanged and None positions outside a multi-replica step.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return candidate_embeddings, candidate_ids, log_q, None
    rows = tf.shape(candidate_embeddings)[:1]
    replica_rows = context.all_gather(rows, axis=0)
    before = tf.range(context.num_replicas_in_sync) < context.replica_id_in_sync_group
    offset = tf.reduce_sum(tf.where(before, replica_rows, tf.zeros_like(replica_rows)))
    positions = offset + tf.range(rows[0])

    def gather(values: Any) -> Any:
        return None if values is None else context.all_gather(values, axis=0)

    return gather(candidate_embeddings), gather(candidate_ids), gather(log_q), positions


def host_tensor(array: Any) -> tf.Tensor:
    """The array through DLPack on CPU (no copy); `convert_to_tensor` on a GPU.

    `tf.convert_to_tensor` copies a NumPy array; `tf.experimental.dlpack`
    adopts its memory, which TensorFlow requires to be 64-byte aligned (an
    unaligned one aborts the process, so callers align it).
    """
    if tf.config.list_logical_devices("GPU"):
        return keras.ops.convert_to_tensor(array)
    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())


def fit_input(x: Any) -> Any:
    """A `ShardDataset` as a `tf.data` pipeline (see `shard_stream`); other `x` unchanged."""
    from two_tower.datasets.shard_dataset import ShardDataset

    return shard_stream(x) if isinstance(x, ShardDataset) else x


def shard_stream(dataset: Any) -> tf.data.Dataset:
    """The batches of a `ShardDataset`, as a `tf.data.Dataset` that makes one Python call per shard.

    Keras hands a `PyDataset` to TensorFlow through `tf.data.Dataset.from_generator`,
    one Python call per batch; measured on 10^7 synthetic interactions
    (`benchmarks/scale.py`), that trained at 0.5-0.7x the examples/s of in-memory
    arrays on 2 cores. Here one `tf.numpy_function` call per shard returns its rows
    in the epoch's order (the same NumPy permutation, ids checked, as
    `ShardDataset.__getitem__`), then `tf.data` slices them into batches in C++ and
    `rebatch` joins a shard's last rows to the next shard's first, so the batches
    are exactly `dataset[0]`, `dataset[1]`, ... Each pass over the pipeline is one
    epoch, as a pass over the `PyDataset` is. Memory: O(shard), as with the
    `PyDataset`.
    """
    first = dataset._columns(int(dataset._plan[0][0]), np.arange(1))  # with any label
    names = sorted(first)
    dtypes = [tf.as_dtype(first[name].dtype) for name in names]

    def shard_rows(position: Any) -> list[Any]:
        columns = dataset._epoch_shard(int(position))
        return [columns[name] for name in names]

    def shard_batches(position: Any) -> tf.data.Dataset:
        values = tf.numpy_function(shard_rows, [position], dtypes, stateful=True)
        columns = {name: tf.reshape(value, [-1]) for name, value in zip(names, values, strict=True)}
        return tf.data.Dataset.from_tensor_slices(columns).batch(dataset.batch_size)

    stream = tf.data.Dataset.range(dataset.num_shards).flat_map(shard_batches)
    stream = stream.rebatch(dataset.batch_size)
    if dataset.label is not None:
        stream = stream.map(dataset.split_label)
    stream = stream.apply(tf.data.experimental.assert_cardinality(dataset.num_batches))
    return stream.prefetch(tf.data.AUTOTUNE)


def keep_state_on_error(model: keras.Model) -> contextlib.AbstractContextManager[None]:
    """Nothing to keep: this backend's trainer leaves the variables in place on errors."""
    del model
    return contextlib.nullcontext()


class _Recorder:
    """Rows gathered from the table and watched by the step's tape."""

    def __init__(self, tape: tf.GradientTape) -> None:
        self.tape = tape
        self.layers: list[Any] = []
        self.ids: list[Any] = []
        self.rows: list[Any] = []

    def lookup(self, layer: Any, ids: Any) -> Any:
        rows = tf.gather(layer.embeddings.value, ids)  # a ResourceGather: O(lookups)
        if layer.trainable:
            self.tape.watch(rows)
            self.layers.append(layer)
            self.ids.append(ids)
            self.rows.append(rows)
        return rows


def _read_rows(variable: keras.Variable, ids: Any) -> Any:
    # A ResourceGather. `ops.take` would read the whole variable first, and a
    # scatter into a variable whose full value is still referenced copies it.
    return tf.gather(variable.value, ids)


def _write_rows(variable: keras.Variable, ids: Any, rows: Any) -> None:
    variable.value.scatter_update(tf.IndexedSlices(rows, ids))


def sparse_train_step(model: keras.Model, data: Any) -> Any:
    """Keras' TensorFlow `train_step` with row-sparse gradients for `SparseEmbedding` tables.

    As Keras' own step, except that the tape is asked for the gradient by each
    looked-up block of rows instead of by the tables, and
    `_sparse_training.apply_updates` writes those rows with `scatter_update`.

    Raises:
        NotImplementedError: under a `tf.distribute` strategy, whose gradient
            aggregation this step does not do.
    """
    from two_tower import _sparse_training

    if tf.distribute.has_strategy():
        raise NotImplementedError(
            "SparseEmbedding tables do not train under a tf.distribute strategy yet; "
            "use keras.layers.Embedding there."
        )
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
        recorder = _Recorder(tape)
        with _sparse_training.recording(recorder):
            y_pred = model(x, training=True)
            loss = model._compute_loss(  # noqa: SLF001
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
        first = next(leaf for leaf in keras.tree.flatten(x) if leaf is not None)
        model._loss_tracker.update_state(loss, sample_weight=tf.shape(first)[0])  # noqa: SLF001
        loss = model.optimizer.scale_loss(loss)
    # After the forward pass, which builds the tables if `fit` did not (e.g. on a
    # dataset's first batch inside the traced step).
    _, dense_variables = _sparse_training.split_variables(model)
    gradients = tape.gradient(loss, dense_variables + recorder.rows)
    row_gradients = [
        tf.zeros_like(rows) if gradient is None else tf.convert_to_tensor(gradient)
        for rows, gradient in zip(recorder.rows, gradients[len(dense_variables) :], strict=True)
    ]
    _sparse_training.apply_updates(
        model.optimizer,
        list(zip(recorder.layers, recorder.ids, row_gradients, strict=True)),
        gradients[: len(dense_variables)],
        dense_variables,
        _read_rows,
        _write_rows,
    )
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
