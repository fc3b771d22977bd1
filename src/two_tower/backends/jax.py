"""JAX: inference compiled with `jax.jit`, without Keras' stateful variable swap.

Keras' JAX `predict` and `predict_on_batch` move the variables' values out of the
variables into a state tuple for the compiled step and write them back after it
(`_get_jax_state` / `jax_state_sync`, and `predict` even empties the variables
while it runs). Two threads doing that at once on one model break each other:
calls fail with `TypeError: 'NoneType' object is not callable` or read emptied
variables. Here the compiled function is pure: the variables' current values are
read (never written) at each call and passed in as arguments, and the function
runs under a `keras.StatelessScope` that maps each variable to its argument.
Reading a value is safe from any thread, so concurrent calls need no lock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import keras
import numpy as np

from two_tower._compiled_cache import CompiledCache

# Hooks with nothing to do on this backend (see two_tower.backends).
from two_tower.backends._defaults import all_replicas as all_replicas
from two_tower.backends._defaults import array_train_function as array_train_function
from two_tower.backends._defaults import check_replicas as check_replicas
from two_tower.backends._defaults import global_negatives as global_negatives
from two_tower.backends._defaults import map_slices as map_slices
from two_tower.backends._defaults import replica_loss as replica_loss
from two_tower.backends._defaults import step_counter as step_counter
from two_tower.backends._defaults import variables_replaced as variables_replaced

# Exports run in a TensorFlow child process.
from two_tower.backends._export_process import export_artefact as export_artefact

array_training = False  # Keras' own array path: each epoch's steps run compiled anyway
max_steps_per_execution: int | None = None
top_k_ties_to_lower_column = True
top_k_orders_signed_zeros = True  # XLA ranks 0.0 above -0.0
search_tile = 2048
search_candidates_major_rows: int | None = None
search_rescore_einsum = False
softmax_from_log_softmax = False


def compile_inference(
    function: Callable[[Any], Any], variables: Callable[[], Sequence[keras.Variable]]
) -> Callable[[Any], Any]:
    """`function` compiled with `jax.jit`, reading `variables()` live at each call.

    Args:
        function: maps a structure of arrays to a structure of tensors; may read
            Keras variables, all of which must be in `variables()`.
        variables: returns the variables `function` reads. Called at every call,
            so variables added later (e.g. by `set_catalogue`) are picked up: a
            new list of variables compiles a new function.

    Returns:
        A thread-safe callable with the same inputs and outputs as `function`.
    """
    # One entry: a new list of variables makes the old function stale.
    compiled: CompiledCache[Callable[..., Any]] = CompiledCache(max_size=1)

    def compile_for(current: tuple[keras.Variable, ...]) -> Callable[..., Any]:
        def pure(values: list[Any], inputs: Any) -> Any:
            with keras.StatelessScope(state_mapping=list(zip(current, values, strict=True))):
                return function(inputs)

        return jax.jit(pure)

    def run(inputs: Any) -> Any:
        current = tuple(variables())
        key = tuple(id(variable) for variable in current)
        step = compiled.get(key, lambda: compile_for(current))
        return step([variable.value for variable in current], inputs)

    return run


def map_devices(function: Callable[[Any], Any], rows: Any, mesh: Any) -> Any:
    """`function` on each device's own rows of `rows`, outputs concatenated by rows.

    Inside a `jax.jit` step, XLA's SPMD partitioner gathers the whole operand
    of a `top_k` onto every device (the CPU `TopK` custom call is not split by
    rows; measured with 8 simulated devices), so every device would rank every
    device's scores. `shard_map` runs `function` once per device on the rows
    that device holds instead.

    Args:
        function: row-wise: maps `[r, ...]` to a structure of `[r, ...]` arrays.
        rows: `[devices × r, ...]`, its axis 0 spread over every axis of `mesh`.
        mesh: the `keras.distribution.DeviceMesh`, or None for `function(rows)`.
    """
    if mesh is None:
        return function(rows)
    spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
    return jax.shard_map(function, mesh=mesh.backend_mesh, in_specs=spec, out_specs=spec)(rows)


class _OneCallInFlight(keras.callbacks.Callback):
    """Waits for each compiled training or evaluation call before the next starts.

    Keras' JAX loop dispatches calls asynchronously, so several can be in
    flight. On a mesh of CPU devices (`--xla_force_host_platform_device_count`)
    with collectives over two mesh axes (`ModelParallel`), XLA's CPU runtime
    then deadlocks: devices wait in the collectives of different calls for
    threads that never come, and XLA aborts the process after 40 s. Measured
    on 2 cores, 8 simulated devices in a 2 x 4 mesh, the MovieLens 100K
    default on its 80,000 training rows: 10 of 10 fits aborted without this,
    0 of 9 with it (one sync per call: `steps_per_execution` steps). Only
    meshes of CPU devices get it; GPUs and TPUs run calls in order per device.
    """

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        jax.block_until_ready(logs)

    def on_test_batch_end(self, batch: int, logs: Any = None) -> None:
        jax.block_until_ready(logs)


def host_tensor(array: Any) -> jax.Array:
    """`jax.device_put(array)`: on CPU it shares an aligned array's memory.

    `jnp.asarray` and Keras' `convert_to_tensor` copy it; XLA's CPU client
    adopts a 64-byte-aligned host buffer instead (measured: 0 bytes added for a
    1 GB array, against 1 GB for `convert_to_tensor`). On a GPU or TPU it is
    the one copy to the device.
    """
    return jax.device_put(array)


def loop_callbacks() -> list[keras.callbacks.Callback]:
    """Callbacks `fit` and `evaluate` add: one call in flight on a CPU device mesh."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return []
    devices = distribution.device_mesh.backend_mesh.devices.flat
    if len(devices) > 1 and all(device.platform == "cpu" for device in devices):
        return [_OneCallInFlight()]
    return []


def serving_slot() -> contextlib.AbstractContextManager[None]:
    """Nothing to wait for: concurrent serving calls run at once (see the module)."""
    return contextlib.nullcontext()


def fit_input(x: Any) -> Any:
    """`x` unchanged: Keras' `PyDataset` adapter already feeds this backend directly."""
    return x


@contextlib.contextmanager
def keep_state_on_error(model: keras.Model) -> Iterator[None]:
    """Puts the model's variable values back if `fit`/`evaluate`/`predict` raises.

    Keras' JAX trainer empties the variables (`_purge_model_variables`) when a
    loop starts and writes them back only when it ends, so an error raised
    inside a step (a bad batch, a shape Keras rejects) leaves every variable
    empty: the trained model is lost, and every later call fails with
    `TypeError: 'NoneType' object is not callable`. JAX arrays are immutable,
    so keeping a reference to each value costs nothing.
    """
    variables = list(model.variables)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    variables += list(getattr(model, "metrics_variables", []))
    kept = [(variable, variable._value) for variable in variables]  # noqa: SLF001
    try:
        yield
    except BaseException:
        for variable, value in kept:
            if value is not None:
                variable.assign(value)
        model._jax_state_synced = True  # noqa: SLF001  nothing stale to write back
        raise


class _Recorder:
    """Rows plus a zero `delta` argument, so the step differentiates by the deltas.

    With `deltas=None` it only records the shape of each lookup's ids: the step
    traces the forward pass once under `jax.eval_shape` to size the deltas.
    """

    def __init__(self, deltas: Sequence[Any] | None) -> None:
        self.deltas = deltas
        self.layers: list[Any] = []
        self.ids: list[Any] = []
        self.shapes: list[tuple[int, ...]] = []

    def lookup(self, layer: Any, ids: Any) -> Any:
        # The table's value is a constant of the differentiated function: no
        # gradient (and no [rows, dim] array) is ever formed for it.
        rows = keras.ops.take(layer.embeddings, ids, axis=0)
        if not layer.trainable:
            return rows
        position = len(self.layers)
        self.layers.append(layer)
        self.ids.append(ids)
        if self.deltas is None:
            self.shapes.append((*tuple(ids.shape), layer.output_dim))
            return rows
        return rows + self.deltas[position]


def check_ids(ids: Any, rows: int, layer_name: str) -> Any:
    """`SparseEmbedding`'s ids, checked on the host when they have values.

    Inside a compiled step (`jax.jit`: `fit`, `evaluate`, `predict`, serving) the
    ids are traced, and JAX has no in-graph error short of a host callback on
    every step; there, negative ids are mapped past the last row, so that every
    id outside `[0, rows)` gathers a row of NaN (JAX fills out-of-range gathers
    with NaN and drops out-of-range scatters) and the loss or scores are NaN,
    never another id's row. Concrete ids (eager calls) raise the same
    `ValueError` as on TensorFlow and torch.
    """
    from two_tower.sparse import _lookups

    if isinstance(ids, jax.core.Tracer):
        return jax.numpy.where(ids < 0, rows, ids)
    _lookups.check_host_ids(np.asarray(ids), layer_name, rows)
    return ids


def read_rows(variable: keras.Variable, ids: Any) -> Any:
    return keras.ops.take(variable.value, ids, axis=0)


def write_rows(variable: keras.Variable, ids: Any, rows: Any) -> None:
    # A scatter into the step's donated state buffer: XLA updates it in place.
    variable.assign(variable.value.at[ids].set(rows))


def sparse_train_step(model: keras.Model, *args: Any) -> Any:
    """Keras' JAX `train_step` with row-sparse gradients for `SparseEmbedding` tables.

    As Keras' own step (a pure function of the state, jitted with the state
    donated), except that the tables are constants of the differentiated loss
    and each lookup gets a zero `delta` argument: the gradient by the deltas is
    the gradient by the looked-up rows. `_sparse_training.apply_updates` then
    writes those rows and hands the other variables to the optimizer.
    """
    from two_tower.sparse import _lookups, _sparse_training

    state, data = args  # Keras' JAX step: (state, data)
    trainable, non_trainable, optimizer_values, metrics_values = state
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    _, dense_variables = _sparse_training.split_variables(model)
    dense_ids = {id(variable) for variable in dense_variables}
    variables = model.trainable_variables
    is_table = [id(variable) not in dense_ids for variable in variables]
    dense_values = [value for value, table in zip(trainable, is_table, strict=True) if not table]

    def forward(dense: list[Any], recorder: _Recorder) -> Any:
        remaining = iter(dense)
        values = [
            value if table else next(remaining)
            for value, table in zip(trainable, is_table, strict=True)
        ]
        with _lookups.recording(recorder):
            return model.compute_loss_and_updates(
                values,
                non_trainable,
                metrics_values,
                x,
                y,
                sample_weight,
                training=True,
                optimizer_variables=optimizer_values,
            )

    sizing = _Recorder(None)
    jax.eval_shape(lambda dense: forward(dense, sizing)[0], dense_values)
    deltas = [
        jax.numpy.zeros(shape, layer.embeddings.dtype)
        for shape, layer in zip(sizing.shapes, sizing.layers, strict=True)
    ]

    def loss_function(dense: list[Any], deltas: list[Any]) -> Any:
        recorder = _Recorder(deltas)
        loss, aux = forward(dense, recorder)
        return loss, (aux, recorder.ids)

    (_, (aux, lookup_ids)), (dense_gradients, row_gradients) = jax.value_and_grad(
        loss_function, argnums=(0, 1), has_aux=True
    )(dense_values, deltas)
    unscaled_loss, y_pred, non_trainable, metrics_values = aux

    mapping = list(zip(variables, trainable, strict=True)) + list(
        zip(model.optimizer.variables, optimizer_values, strict=True)
    )
    with keras.StatelessScope(state_mapping=mapping) as scope:
        _sparse_training.apply_updates(
            model.optimizer,
            list(zip(sizing.layers, lookup_ids, row_gradients, strict=True)),
            dense_gradients,
            dense_variables,
            read_rows,
            write_rows,
        )

    def current(variable: keras.Variable, old: Any) -> Any:
        new = scope.get_current_value(variable)
        return old if new is None else new

    trainable = [current(v, old) for v, old in zip(variables, trainable, strict=True)]
    optimizer_values = [
        current(v, old) for v, old in zip(model.optimizer.variables, optimizer_values, strict=True)
    ]
    logs, metrics_values = model._update_metrics_variables(  # noqa: SLF001
        metrics_values, unscaled_loss, x, y, y_pred, sample_weight
    )
    return logs, (trainable, non_trainable, optimizer_values, metrics_values)


def train_step(model: keras.Model, keras_train_step: Callable[..., Any], *args: Any) -> Any:
    """Keras' own JAX `train_step`: a jitted step is already at the hand-written floor."""
    del model
    return keras_train_step(*args)
