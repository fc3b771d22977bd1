"""TensorFlow: inference compiled with `tf.function`.

A `tf.function` reads the variables it captures at each call (never a copy taken
at trace time), and TensorFlow serialises its own tracing, so concurrent calls
need no lock. XLA is not requested: Keras itself turns it off on CPU-only
machines (its `jit_compile="auto"`), where it is slower for these steps.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf
from keras.src.losses.loss import unscale_loss_for_distribution

from two_tower.backends._defaults import check_replicas as check_replicas
from two_tower.backends._defaults import loop_callbacks as loop_callbacks
from two_tower.backends._defaults import map_devices as map_devices
from two_tower.backends._defaults import map_slices as map_slices
from two_tower.backends._defaults import variables_replaced as variables_replaced

# Hooks with nothing to do on this backend (see two_tower.backends).
from two_tower.export._plan import ExportPlan
from two_tower.models import _array_training

array_training = True
max_steps_per_execution: int | None = None
top_k_ties_to_lower_column = True
top_k_orders_signed_zeros = True  # XLA ranks 0.0 above -0.0
search_tile = 8192
search_candidates_major_rows: int | None = 0
search_rescore_einsum = True
softmax_from_log_softmax = False


def export_artefact(model: keras.Model, plan: ExportPlan, path: str, format: str) -> None:
    """Writes the export artefact in this process: Keras already runs on TensorFlow."""
    from two_tower.backends import tensorflow_export

    tensorflow_export.write(model, plan, path, format)


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
    compiled = tf.function(function, reduce_retracing=True)

    def call(inputs: Any) -> Any:
        # A `SparseEmbedding`'s in-graph id check raises its `ValueError` here too.
        with _id_check_errors():
            return compiled(inputs)

    return call


def serving_slot() -> contextlib.AbstractContextManager[None]:
    """Nothing to wait for: concurrent serving calls run at once (see the module)."""
    return contextlib.nullcontext()


def replica_loss(loss: Any, rows: Any, batch_rows: Any = None) -> Any:
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
    replica's `batch_rows` (the rows of its x). A term without gradient makes
    that the replica's share of the global mean, so the logged loss is the
    global batch's mean as on one device, uneven last batch included (before:
    off by up to 3.8e-3 on 4 replicas). Per-position training weighs a replica
    by its items (`rows`), not its rows of x (`batch_rows`), which differ.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return loss
    rows = tf.cast(rows, loss.dtype)
    # (At least 1: a global batch with no items at all has a loss of 0.)
    total = tf.maximum(context.all_reduce(tf.distribute.ReduceOp.SUM, rows), 1.0)
    scaled = loss * rows / total
    if batch_rows is None:
        logged = loss / context.num_replicas_in_sync  # what Keras multiplies back
    else:
        batch_rows = tf.cast(batch_rows, loss.dtype)
        batch_total = context.all_reduce(tf.distribute.ReduceOp.SUM, batch_rows)
        # Keras logs sum_r(R * logged_r * batch_rows_r) / batch_total: scaled's sum.
        # (A replica with no rows has a scaled loss of 0 and no weight in the log.)
        replicas = context.num_replicas_in_sync
        logged = scaled * batch_total / (replicas * tf.maximum(batch_rows, 1.0))
    return scaled + tf.stop_gradient(logged - scaled)


def all_replicas(values: Any) -> Any:
    """`values` of every replica in sync, concatenated in replica order (an all-gather
    without gradients' meaning: callers pass ids and statistics); unchanged outside a
    multi-replica step."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values
    return context.all_gather(values, axis=0)


def global_negatives(
    candidate_embeddings: Any, candidate_ids: Any, log_q: Any, candidate_mask: Any
) -> tuple[Any, Any, Any, Any, Any]:
    """Each replica's batch candidates, gathered from every replica in sync.

    Under a `tf.distribute` strategy Keras' step runs once per replica on its
    share of the global batch, so in-batch negatives would come from that share
    only (TFRS has done so since it removed its cross-replica gather in 2021).
    Here the candidate embeddings, with their ids (accidental hits) and log
    sampling probabilities (logQ) and mask (per-position training's padding),
    are all-gathered in replica order, and the
    replica's positives are its own rows of the gathered batch: row i of replica
    r is column `offset_r + i`, where `offset_r` counts the rows of replicas
    before r (shares may differ by one row in a last partial batch).
    `all_gather`'s gradient sums every replica's gradient by the gathered rows
    and hands each replica its own slice, so together with `replica_loss` the
    summed replica gradients equal the single-device gradient of the global
    batch.

    Returns:
        `(candidate_embeddings, candidate_ids, log_q, candidate_mask,
        positive_positions)`; the arguments unchanged and None positions
        outside a multi-replica step.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return candidate_embeddings, candidate_ids, log_q, candidate_mask, None
    rows = tf.shape(candidate_embeddings)[:1]
    replica_rows = context.all_gather(rows, axis=0)
    before = tf.range(context.num_replicas_in_sync) < context.replica_id_in_sync_group
    offset = tf.reduce_sum(tf.where(before, replica_rows, tf.zeros_like(replica_rows)))
    positions = offset + tf.range(rows[0])

    def gather(values: Any) -> Any:
        return None if values is None else context.all_gather(values, axis=0)

    return (
        gather(candidate_embeddings),
        gather(candidate_ids),
        gather(log_q),
        gather(candidate_mask),
        positions,
    )


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
    column_dtypes = dataset.column_dtypes()  # with any label
    names = sorted(column_dtypes)
    dtypes = [tf.as_dtype(column_dtypes[name]) for name in names]

    def shard_rows(position: Any) -> list[Any]:
        columns = dataset.epoch_shard(int(position))
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
    """Nothing to keep (this backend's trainer leaves the variables in place on
    errors); the in-graph id check of `check_ids` is raised as its `ValueError`."""
    del model
    return _id_check_errors()


@contextlib.contextmanager
def _id_check_errors() -> Iterator[None]:
    """Raises the in-graph id check of `check_ids` as its `ValueError` (fit, serving)."""
    try:
        yield
    except tf.errors.InvalidArgumentError as error:
        found = _ID_CHECK.search(error.message)
        if found is None:
            raise
        from two_tower.sparse import _lookups

        low, high = (_whole(found.group(name)) for name in ("low", "high"))
        raise _lookups.id_range_error(
            found.group("name"), int(found.group("rows")), low, high
        ) from None


_ID_CHECK = re.compile(
    # TensorFlow escapes the quotes around the name in a graph error's message.
    r"SparseEmbedding \\?'(?P<name>[^'\\]*)\\?' takes ids in \[0, (?P<rows>\d+)\)[^\]]*\] "
    r"\[(?P<low>[^\]]*)\] \[(?P<high>[^\]]*)\]"
)


def _whole(text: str) -> Any:
    number = float(text)
    return int(number) if number.is_integer() else number


def check_ids(ids: Any, rows: int, layer_name: str) -> Any:
    """`SparseEmbedding`'s ids, checked on the host or, in a `tf.function`, in the graph.

    Eager ids raise the same `ValueError` as on the other backends. In a graph
    (`fit`, `evaluate`, `predict`, serving) an assertion runs before the lookup,
    and `keep_state_on_error` (and every function of `compile_inference`) turns
    its error into that `ValueError` for `fit`, `evaluate`, `predict` and serving
    (TensorFlow's own error is an obscure one from the
    gather on CPU, and a silent row of zeros on GPU). XLA drops assertions, so
    a step compiled with `jit_compile=True` is not checked.
    """
    from two_tower.sparse import _lookups

    if not isinstance(ids, tf.Tensor):
        return ids
    if tf.executing_eagerly():
        _lookups.check_host_ids(ids.numpy(), layer_name, rows)
        return ids
    flat = tf.reshape(ids, (-1,))
    empty = tf.equal(tf.size(flat), 0)
    low = tf.reduce_min(flat)
    high = tf.reduce_max(flat)
    valid = tf.logical_or(empty, tf.logical_and(low >= 0, high < tf.cast(rows, high.dtype)))
    message = (
        f"SparseEmbedding {layer_name!r} {_lookups.ID_RANGE_MARKER}{rows}) (its "
        "input_dim). Received ids from (low, high)"
    )
    check = tf.debugging.Assert(valid, [message, low, high], summarize=1)
    with tf.control_dependencies([check]):
        return tf.identity(ids)


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


def read_rows(variable: keras.Variable, ids: Any) -> Any:
    # A ResourceGather. `ops.take` would read the whole variable first, and a
    # scatter into a variable whose full value is still referenced copies it.
    return tf.gather(variable.value, ids)


def write_rows(variable: keras.Variable, ids: Any, rows: Any) -> None:
    variable.value.scatter_update(tf.IndexedSlices(rows, ids))


def _forward_and_loss(model: keras.Model, x: Any, y: Any, sample_weight: Any) -> tuple[Any, Any]:
    """The start of Keras' TensorFlow `train_step`, to run under the step's tape.

    The forward pass, the loss, the loss tracker's update (by the batch's rows,
    the loss unscaled from a replica's share) and the optimizer's `scale_loss`,
    in Keras' order. Deliberately not shared with `backends/torch.py`'s twin:
    each follows its own backend's Keras trainer (this one unscales the tracked
    loss for `tf.distribute` and reads the rows with `tf.shape` in graph mode).

    Returns:
        `(y_pred, loss)`: the predictions and the scaled loss to differentiate.
    """
    y_pred = model(x, training=True)
    loss = model._compute_loss(  # noqa: SLF001
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )
    first = next(leaf for leaf in keras.tree.flatten(x) if leaf is not None)
    model._loss_tracker.update_state(  # noqa: SLF001
        unscale_loss_for_distribution(loss), sample_weight=tf.shape(first)[0]
    )
    if model.optimizer is not None:
        loss = model.optimizer.scale_loss(loss)
    return y_pred, loss


def sparse_train_step(model: keras.Model, *args: Any) -> Any:
    """Keras' TensorFlow `train_step` with row-sparse gradients for `SparseEmbedding` tables.

    As Keras' own step, except that the tape is asked for the gradient by each
    looked-up block of rows instead of by the tables, and
    `_sparse_training.apply_updates` writes those rows with `scatter_update`.

    Raises:
        NotImplementedError: under a `tf.distribute` strategy, whose gradient
            aggregation this step does not do.
    """
    from two_tower.sparse import _lookups, _sparse_training

    if tf.distribute.has_strategy():
        raise NotImplementedError(
            "SparseEmbedding tables do not train under a tf.distribute strategy yet; "
            "use keras.layers.Embedding there."
        )
    (data,) = args
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
        recorder = _Recorder(tape)
        with _lookups.recording(recorder):
            y_pred, loss = _forward_and_loss(model, x, y, sample_weight)
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
        read_rows,
        write_rows,
    )
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def step_counter(steps: int) -> tf.data.Dataset:
    """What `fit` hands Keras instead of arrays: the step numbers of one epoch."""
    return tf.data.Dataset.range(steps)


class _ArrayTrainer:
    """A model's compiled multi-step function over device columns (see `array_train_function`).

    Built once per compiled model and reused by every `fit` call on arrays of
    the same structure, so a second `fit` does not trace again.
    """

    def __init__(self, model: keras.Model, columns: Any) -> None:
        self.model = model
        self.key = self._key(model, columns)
        self.batch_size = columns.batch_size
        self.steps_per_execution = int(model.steps_per_execution)
        # NumPy's permutation: 1 ms for 80,000 rows, `keras.random.shuffle` 7.5.
        self.random = _array_training.random_generator()
        self.execution = tf.function(self._execution, reduce_retracing=True, autograph=False)

    @staticmethod
    def _key(model: keras.Model, columns: Any) -> Any:
        """What the compiled function depends on besides the tensors it is given."""
        structure = keras.tree.map_structure(lambda _: None, columns.data)
        return structure, columns.batch_size, int(model.steps_per_execution)

    def matches(self, model: keras.Model, columns: Any) -> bool:
        return self.key == self._key(model, columns)

    def _one_step(self, step: Any, data: Any, order: Any) -> Any:
        indices = _array_training.batch_rows(order, step, self.batch_size)
        batch = keras.tree.map_structure(lambda column: tf.gather(column, indices), data)
        return self.model.train_step(batch)

    def _execution(self, data: Any, order: Any, start: Any, count: Any) -> Any:
        step_spec = tf.TensorSpec([], tf.int64)
        order_spec = tf.TensorSpec([None], tf.int64)
        data_spec = keras.tree.map_structure(
            lambda column: tf.TensorSpec([None, *column.shape[1:]], column.dtype), data
        )
        # The logs' structure, for the loop's initial value; the loop then
        # traces the step once more, inlined (a nested call cost 0.06 ms/step).
        traced = tf.function(self._one_step, autograph=False).get_concrete_function(
            step_spec, data_spec, order_spec
        )
        zeros = keras.tree.map_structure(
            lambda spec: tf.zeros(spec.shape, spec.dtype), traced.structured_outputs
        )

        def body(done: Any, logs: Any) -> Any:
            return done + 1, self._one_step(start + done, data, order)

        _, logs = tf.while_loop(
            lambda done, _: done < count, body, (tf.constant(0, tf.int64), zeros)
        )
        return logs


def array_train_function(model: keras.Model, columns: Any) -> Callable[[Any], Any] | None:
    """Keras' train function for `fit` on arrays: steps over device-resident columns.

    Keras' own TensorFlow loop takes each batch from a `tf.data` iterator inside
    a `tf.while_loop` of `Optional`s and calls the step as a nested function;
    measured on the keras-rs basic retrieval tutorial's configuration (MSE,
    Adagrad, batch 1000), that loop and the array adapter's
    shuffled gather cost about 1.4 ms of a 1.9 ms step. Here each execution of
    `steps_per_execution` steps is one `tf.function` call, a `tf.while_loop`
    that gathers each batch from the columns with `tf.gather` by the pass's
    order (drawn when Keras opens a new iterator over `step_counter`) and runs
    `model.train_step` on it. Keras' iterator is not read: the steps are
    counted here, as Keras counts them (reading it cost 0.15 ms per step). The
    logs are the last step's, as in Keras.

    Returns:
        The train function, or None under a `tf.distribute` strategy (Keras'
        own path then runs).
    """
    if tf.distribute.has_strategy() or getattr(model, "_distribute_strategy", None) is not None:
        return None
    trainer = getattr(model, "_array_trainer", None)
    if trainer is None or not trainer.matches(model, columns):
        trainer = _ArrayTrainer(model, columns)
        model._array_trainer = trainer  # noqa: SLF001
    data = keras.tree.map_structure(tf.convert_to_tensor, columns.data)
    # The current pass over the steps: Keras' iterator, the rows' order, steps done.
    current: dict[str, Any] = {"iterator": None}

    def train_function(iterator: Any) -> Any:
        if iterator is not current["iterator"]:
            # Keras opens a new iterator for each pass over the step counter
            # (each epoch, or when `steps_per_epoch` has run a pass out).
            order = trainer.random.permutation(columns.rows) if columns.shuffle else None
            current.update(
                iterator=iterator,
                done=0,
                order=tf.range(columns.rows, dtype=tf.int64)
                if order is None
                else tf.constant(order),
            )
        count = min(trainer.steps_per_execution, columns.steps - current["done"])
        if count <= 0:
            raise StopIteration  # as from Keras' own iterator, run out
        logs = trainer.execution(
            data,
            current["order"],
            tf.constant(current["done"], tf.int64),
            tf.constant(count, tf.int64),
        )
        current["done"] += count
        return logs

    return train_function


DENSE_GRADIENT_ROWS = 16_384
"""Tables of at most this many rows get dense gradients in `train_step`; larger
ones keep row-sparse gradients with their duplicate ids summed. Measured on the
keras-rs basic retrieval tutorial's step (Adagrad, batch 1000; ms/step, dense /
summed sparse / Keras' own): 1,683 rows 0.15 / 0.34 / 0.30; 16,000 rows 0.57 /
0.59 / 0.51; 160,000 rows 6.4 / 3.6 / 3.7."""


def _summed_gradient(gradient: Any, variable: keras.Variable) -> Any:
    """`gradient` with each row's contributions summed, as JAX and torch compute it.

    `tf.gather`'s gradient is an `IndexedSlices` with one slice per lookup, and
    Keras' optimizers square those slices before adding them (`scatter_add`),
    so an id looked up twice in a batch would accumulate `g1**2 + g2**2` instead
    of `(g1 + g2)**2` in Adagrad's accumulator or Adam's second moment. Small
    tables get the dense gradient (faster than any scatter at that size); larger
    ones keep an `IndexedSlices` with unique rows (a segment sum), O(lookups).
    """
    if not isinstance(gradient, tf.IndexedSlices):
        return gradient
    rows = variable.shape[0]
    if rows is not None and rows <= DENSE_GRADIENT_ROWS:
        return tf.convert_to_tensor(gradient)
    unique_ids, positions = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(gradient.values, positions, tf.shape(unique_ids)[0])
    return tf.IndexedSlices(values, unique_ids, gradient.dense_shape)


def train_step(model: keras.Model, keras_train_step: Callable[..., Any], *args: Any) -> Any:
    """Keras' TensorFlow `train_step`, with each table's gradient rows summed.

    As `keras.Model.train_step` on TensorFlow (forward under a tape, the loss
    tracker, `scale_loss`, `apply_gradients`, `compute_metrics`), except that
    gradients pass through `_summed_gradient` first. So the optimizer sees the
    gradients JAX and torch compute, and for tables up to `DENSE_GRADIENT_ROWS`
    rows a dense one, which on the keras-rs tutorial's configuration halves the
    step (0.42 to 0.18 ms; `benchmarks/train_speed.py`). `keras_train_step` is unused.
    """
    del keras_train_step
    (data,) = args
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
        y_pred, loss = _forward_and_loss(model, x, y, sample_weight)
    if model.trainable_weights:
        variables = model.trainable_weights
        gradients = tape.gradient(loss, variables)
        gradients = [
            _summed_gradient(gradient, variable)
            for gradient, variable in zip(gradients, variables, strict=True)
        ]
        model.optimizer.apply_gradients(zip(gradients, variables, strict=True))
    else:
        warnings.warn("The model does not have any trainable weights.", stacklevel=2)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
