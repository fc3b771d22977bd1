"""PyTorch: inference run eagerly under `torch.no_grad()`, a few calls at a time.

Keras on torch runs its own predict steps eagerly unless `jit_compile=True`, and
`torch.compile` costs seconds per new shape, more than a search saves here. Eager
calls read the variables live, and grad mode is thread-local, so concurrent
calls are correct without a lock.

They are not faster, though, beyond a couple of threads: an eager search is many
small ops, each taking and releasing the GIL, and 4 or 8 threads interleaving
them ran at 0.6-0.8x the rate of the same calls made one at a time
(`benchmarks/retrieval.py --concurrency`, with 1 or 2 intra-op threads alike).
So `serving_slot` lets `SERVING_SLOTS` serving calls run at once and queues the
rest.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import keras
import numpy as np
import torch

# Several processes (`torchrun`): the collectives of the train steps.
from two_tower.backends import torch_distributed

# Hooks with nothing to do on this backend (see two_tower.backends).
from two_tower.backends._defaults import map_devices as map_devices

# Exports run in a TensorFlow child process.
from two_tower.backends._export_process import export_artefact as export_artefact
from two_tower.backends.torch_distributed import all_replicas as all_replicas
from two_tower.backends.torch_distributed import global_negatives as global_negatives
from two_tower.models import _array_training

SERVING_SLOTS = 2
"""Serving calls (`recommend`, `similar_items`, `search`...) that run at once."""


class _Slots:
    """A semaphore that a thread may re-enter (`recommend` calls `search`)."""

    def __init__(self, slots: int) -> None:
        self._semaphore = threading.BoundedSemaphore(slots)
        self._depth = threading.local()

    def __enter__(self) -> None:
        depth = getattr(self._depth, "value", 0)
        if depth == 0:
            self._semaphore.acquire()
        self._depth.value = depth + 1

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._depth.value -= 1
        if self._depth.value == 0:
            self._semaphore.release()


_SLOTS = _Slots(SERVING_SLOTS)


array_training = True
max_steps_per_execution: int | None = 1  # Keras on torch rejects more
top_k_ties_to_lower_column = False  # torch.topk's tie order is unspecified
top_k_orders_signed_zeros = False  # torch compares -0.0 and 0.0 as equal
search_tile = 2048
search_candidates_major_rows: int | None = 256
search_rescore_einsum = False
softmax_from_log_softmax = True  # one fused kernel (`losses.retrieval_softmax`)


def map_slices(function: Callable[[Any], Any], xs: Any) -> Any:
    """`function` of each slice of `xs` along axis 0, stacked: a plain loop.

    Keras' torch `ops.map` is a scan that took twice as long for the tiles of a
    search (`_tiled_top_k`; 1,024 queries × 2^20 candidates). Each output is
    written into one preallocated tensor, so the outputs are never held twice.
    """
    count = int((xs[0] if isinstance(xs, tuple) else xs).shape[0])

    def one(i: int) -> Any:
        return function(tuple(x[i] for x in xs) if isinstance(xs, tuple) else xs[i])

    first = one(0)
    stacked = first.new_empty((count, *first.shape))
    stacked[0] = first
    for i in range(1, count):
        stacked[i] = one(i)
    return stacked


def serving_slot() -> _Slots:
    """A context manager held for a whole serving call: at most `SERVING_SLOTS` at once."""
    return _SLOTS


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


def check_replicas(what: str, x: Any) -> None:
    """Raises where `fit` under a torch process group would train on each global
    batch as if it were one process's share.

    Under several processes, `fit` on NumPy arrays cuts each process's rows out
    of every global batch on two_tower's own array path (`array_train_function`),
    which hands Keras a step counter instead. Arrays that still reach Keras (with
    `validation_split`, `class_weight`, `shuffle="batch"`, `run_eagerly` or
    `jit_compile=True`, torch tensors, or arguments Keras itself refuses) would
    reach every process whole, and so would a `ShardDataset`, which reads the
    same shards in every process. Other datasets and generators are each
    process's own batches (see `torch_distributed`), so they pass.

    Raises:
        ValueError: naming the world size and what to do instead.
    """
    size = torch_distributed.world_size()
    if what != "fit" or size == 1:
        return
    from two_tower.datasets.shard_dataset import ShardDataset

    if isinstance(x, ShardDataset):
        raise ValueError(
            f"Under a torch process group of {size} processes, a ShardDataset would give "
            "every process every global batch, as if each were its own share. Give each "
            "process its own batches (a PyDataset or DataLoader of its rows of each batch), "
            "or pass NumPy arrays, which fit splits (see docs/distributed.md, 'PyTorch')."
        )
    if isinstance(x, dict):
        raise ValueError(
            f"Under a torch process group of {size} processes, fit splits in-memory arrays "
            "into each process's share of every batch only for NumPy arrays without "
            "validation_split, class_weight, shuffle='batch', run_eagerly and "
            "jit_compile=True: otherwise Keras' own adapter would hand the arrays whole to "
            "every process. Pass NumPy arrays and validation_data, or give each process its "
            "own batches as a dataset (see docs/distributed.md, 'PyTorch'). Received x of "
            f"{sorted({type(leaf).__name__ for leaf in keras.tree.flatten(x)})}"
        )


def loop_callbacks() -> list[keras.callbacks.Callback]:
    """`_BatchEndsInStep`, and under a process group of several processes a callback
    that has the first step of each `fit` broadcast rank 0's variables
    (`torch_distributed`)."""
    callbacks: list[keras.callbacks.Callback] = [_BatchEndsInStep()]
    if torch_distributed.world_size() > 1:
        callbacks.append(_SynchroniseAtTrainBegin())
    return callbacks


class _BatchEndsInStep(keras.callbacks.Callback):
    """Makes Keras call the batch-end callbacks on the training thread.

    Keras dispatches `on_train_batch_end` and `on_test_batch_end` to a thread
    pool when every callback allows it, so that a JAX or TensorFlow step can run
    on the device meanwhile. A torch step has finished when it returns, so
    nothing overlaps: each step only hands the GIL to the pool's thread and
    back, which on a CPU busy with other work waits for the scheduler
    (`benchmarks/torch_contention.py`). A callback that overrides the batch ends
    without declaring `async_safe`, as this one does, turns that off.
    """

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        del batch, logs

    def on_test_batch_end(self, batch: int, logs: Any = None) -> None:
        del batch, logs


class _SynchroniseAtTrainBegin(keras.callbacks.Callback):
    """Has the first step of each `fit` broadcast rank 0's variables (`_synchronise`)."""

    def on_train_begin(self, logs: Any = None) -> None:
        self.model._process_group_synchronised = False  # noqa: SLF001


def _synchronise(model: keras.Model) -> None:
    """Rank 0's variables on every process, at the first step of a `fit` (or the
    first `train_on_batch`).

    Raises:
        ValueError: a `SparseEmbedding` with an `embeddings_regularizer`, whose
            penalty on the looked-up rows has no exact share per process (see
            `_check_row_penalties`).
    """
    if not getattr(model, "_process_group_synchronised", False):
        _check_row_penalties(model)
        torch_distributed.broadcast_state(model)
        model._process_group_synchronised = True  # noqa: SLF001


def _check_row_penalties(model: keras.Model) -> None:
    """Refuses `SparseEmbedding` tables with an `embeddings_regularizer` under a
    process group of several processes.

    Their penalty is added per lookup, on the rows looked up. A lookup of the
    batch's ids is split between the processes, one of the whole catalogue
    (`full_softmax`) is repeated on each, and the loss is scaled by each
    process's share of the batch: no one scaling makes both sum to one
    process's penalty. A penalty on the whole table (`keras.layers.Embedding`'s)
    is the same on every process and exact.
    """
    from two_tower.sparse import _sparse_training

    for layer in _sparse_training.sparse_tables(model):
        if layer.embeddings_regularizer is not None:
            raise ValueError(
                f"SparseEmbedding {layer.name!r} has an embeddings_regularizer, which "
                "penalises the rows each lookup reads: under a torch process group of "
                f"{torch_distributed.world_size()} processes its share per process is not "
                "exact (batch lookups are split, catalogue lookups repeated). Train it "
                "without one (e.g. from_ids(..., sparse=True, l2=0.0)), or use "
                "keras.layers.Embedding tables, whose penalty on the whole table is exact."
            )


def replica_loss(loss: Any, rows: Any, batch_rows: Any = None) -> Any:
    """This process's share of the global mean under a process group of several
    processes (`torch_distributed.replica_loss`); `loss` unchanged otherwise.
    `batch_rows` is unused: the step logs the global mean itself."""
    del batch_rows
    return torch_distributed.replica_loss(loss, rows)


def host_tensor(array: Any) -> torch.Tensor:
    """`torch.from_numpy(array)`, moved to Keras' device (no copy on CPU).

    Keras' `convert_to_tensor` copies a NumPy array; `from_numpy` shares it.
    """
    return keras.ops.convert_to_tensor(torch.from_numpy(array))


def fit_input(x: Any) -> Any:
    """`x` unchanged: Keras' `PyDataset` adapter already feeds this backend directly."""
    return x


def keep_state_on_error(model: keras.Model) -> contextlib.AbstractContextManager[None]:
    """Nothing to keep: this backend's trainer leaves the variables in place on errors."""
    del model
    return contextlib.nullcontext()


def check_ids(ids: Any, rows: int, layer_name: str) -> Any:
    """`SparseEmbedding`'s ids, checked on the host (Keras runs torch steps eagerly).

    The same `ValueError` as on the other backends, instead of torch's
    `IndexError` (on CUDA, a device-side assert that leaves the process unusable).
    One min/max reduction per lookup; on an accelerator, reading it waits for the
    device. Symbolic (`meta`) tensors, which Keras uses to infer shapes, pass.
    """
    from two_tower.sparse import _lookups

    if not isinstance(ids, torch.Tensor) or ids.device.type == "meta" or ids.numel() == 0:
        return ids
    if ids.is_floating_point():
        _lookups.check_host_ids(ids.detach().cpu().numpy(), layer_name, rows)
        return ids
    low, high = torch.aminmax(ids.detach())
    if int(low) < 0 or int(high) >= rows:
        raise _lookups.id_range_error(layer_name, rows, int(low), int(high))
    return ids


class _Recorder:
    """Rows copied out of the table as leaf tensors whose `.grad` the step reads."""

    def __init__(self) -> None:
        self.layers: list[Any] = []
        self.ids: list[Any] = []
        self.rows: list[Any] = []

    def lookup(self, layer: Any, ids: Any) -> Any:
        table = layer.embeddings.value
        flat = ids.reshape(-1).long()
        rows = torch.index_select(table.detach(), 0, flat).reshape(*ids.shape, table.shape[1])
        if layer.trainable:
            rows.requires_grad_(True)
            self.layers.append(layer)
            self.ids.append(flat)
            self.rows.append(rows)
        return rows


def read_rows(variable: keras.Variable, ids: Any) -> Any:
    return torch.index_select(variable.value, 0, ids.long())


def write_rows(variable: keras.Variable, ids: Any, rows: Any) -> None:
    variable.value.index_copy_(0, ids.long(), rows.to(variable.value.dtype))


def sparse_train_step(model: keras.Model, *args: Any) -> Any:
    """Keras' torch `train_step` with row-sparse gradients for `SparseEmbedding` tables.

    As Keras' own step, except that each lookup's rows are a leaf tensor cut
    off the table, so `backward()` fills a `[lookups, dim]` gradient and never a
    `[rows, dim]` one, and `_sparse_training.apply_updates` writes those rows
    with `index_copy_`. Under a process group of several processes, the dense
    gradients are summed and every process's looked-up ids and row gradients
    gathered before the update (`torch_distributed`).
    """
    from two_tower.sparse import _lookups, _sparse_training

    (data,) = args
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    with torch_distributed.training_step() as several:
        if several:
            _synchronise(model)
        recorder = _Recorder()
        model.zero_grad()
        with _lookups.recording(recorder):
            # Through `Layer.__call__`: `_calls_directly`'s shortcut is the dense step's.
            y_pred, loss, logged = _forward_and_loss(
                model, x, y, sample_weight, model, track=not several
            )
        # After the forward pass, which builds the tables if `fit` did not.
        _, dense_variables = _sparse_training.split_variables(model)
        if loss.requires_grad:  # False when nothing trainable was used
            loss.backward()
        row_gradients = [
            torch.zeros_like(rows) if rows.grad is None else rows.grad for rows in recorder.rows
        ]
        lookups = list(zip(recorder.layers, recorder.ids, row_gradients, strict=True))
        dense_gradients = [variable.value.grad for variable in dense_variables]
        if several:
            dense_gradients = _reduced(model, dense_gradients, logged, x)
            lookups = torch_distributed.gather_rows(lookups)
    with torch.no_grad():
        _sparse_training.apply_updates(
            model.optimizer, lookups, dense_gradients, dense_variables, read_rows, write_rows
        )
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _reduced(
    model: keras.Model, gradients: list[Any], logged: Any, x: Any
) -> list[torch.Tensor | None]:
    """`gradients` summed over the processes, and the global batch's mean loss
    logged by its rows, as one process logs its batch."""
    gradients, loss, rows = torch_distributed.reduce_gradients(gradients, logged, _rows(x))
    model._loss_tracker.update_state(loss, sample_weight=rows)  # noqa: SLF001
    return gradients


def _rows(x: Any) -> int:
    """The rows of a batch `x` (those of its first array)."""
    first = next(leaf for leaf in keras.tree.flatten(x) if leaf is not None)
    return int(first.shape[0])


class _Steps(torch.utils.data.Dataset):
    """The step numbers of one epoch, as a map-style dataset."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> int:
        return step


def step_counter(steps: int) -> torch.utils.data.DataLoader:
    """What `fit` hands Keras instead of arrays: the step numbers of one epoch."""
    return torch.utils.data.DataLoader(_Steps(steps), batch_size=None, shuffle=False)


def array_train_function(model: keras.Model, columns: Any) -> Callable[[Any], Any] | None:
    """Keras' train function for `fit` on arrays: batches cut from columns converted once.

    Keras' array adapter on torch slices each batch out of the NumPy arrays
    behind a `DataLoader` whose sampler yields the epoch's indices one at a
    time, then converts it; here the columns become tensors once per `fit`, and
    each step takes its rows by the epoch's order (a NumPy permutation drawn at
    step 0 of each pass when shuffling) with `_row_taker`'s gather: NumPy's on
    the CPU, `index_select` on an accelerator.

    Returns:
        The train function, or None with `steps_per_execution` above 1, which
        Keras' torch trainer refuses (its own path then raises).
    """
    if model.steps_per_execution > 1:
        return None  # Keras' own path raises its error: torch runs one step per call
    # What Keras' torch `fit` does with its first batch, which it no longer sees.
    first = keras.tree.map_structure(lambda column: column[: columns.batch_size], columns.data)
    model._symbolic_build(data_batch=first)  # noqa: SLF001
    data = keras.tree.map_structure(keras.ops.convert_to_tensor, columns.data)
    device = keras.tree.flatten(data)[0].device
    takers = keras.tree.map_structure(_row_taker, data)
    on_host = device.type == "cpu"
    torch_distributed.check_same(
        "fit on arrays",
        {"rows": columns.rows, "batch_size": columns.batch_size, "shuffle": columns.shuffle},
    )
    random = _array_training.random_generator(torch_distributed.shared_seed)
    order = [np.arange(columns.rows) if on_host else torch.arange(columns.rows, device=device)]

    def train_function(steps: Any) -> Any:
        step = int(steps[0])
        if step == 0 and columns.shuffle:
            permutation = random.permutation(columns.rows)
            order[0] = permutation if on_host else torch.from_numpy(permutation).to(device)
        indices = _array_training.batch_rows(order[0], step, columns.batch_size)
        # Under several processes, this process's block of the global batch.
        indices = torch_distributed.local_rows(indices)
        batch = keras.tree.map_structure(lambda take: take(indices), takers)
        return model.train_step(batch)

    return train_function


def _row_taker(column: torch.Tensor) -> Callable[[Any], torch.Tensor]:
    """How a step takes its rows of `column`: rows in, `[batch, ...]` tensor out.

    On the CPU, NumPy's `take` on the tensor's memory, wrapped without a copy:
    the same values as `column.index_select(0, rows)`, but NumPy gathers on the
    calling thread, where torch's gather may run in parallel once a batch holds
    more than 32,768 elements (1000 rows of a 50-wide history do). Each
    parallel region ends in a barrier that waits for every OpenMP thread, so on
    a CPU shared with other work one region can cost a whole scheduler slice
    (`benchmarks/torch_contention.py`); Keras' own path slices NumPy arrays
    too. The rows are a NumPy array there, and a tensor on the column's device
    elsewhere.
    """
    if column.device.type == "cpu":
        try:
            array = column.numpy()
        except TypeError:  # a dtype NumPy lacks (bfloat16)
            return lambda rows: column.index_select(0, torch.from_numpy(rows))
        return lambda rows: torch.from_numpy(array.take(rows, axis=0))
    return lambda rows: column.index_select(0, rows)


def train_step(model: keras.Model, keras_train_step: Callable[..., Any], *args: Any) -> Any:
    """Keras' torch `train_step` with less Python per step.

    The same computation as `keras.Model.train_step` on torch (forward, loss,
    loss tracker, `scale_loss`, `backward`, `optimizer.apply`,
    `compute_metrics`), with two shortcuts measured on the keras-rs basic
    retrieval tutorial's configuration (`benchmarks/train_speed.py`):
    - gradients are cleared by setting the trainable variables' `.grad` to None
      (`Module.zero_grad` walks every submodule);
    - the model's own `call` runs without `Layer.__call__` around it where that
      changes nothing (`_calls_directly`).
    Under a process group of several processes, the gradients are summed over
    the processes before the update (`torch_distributed`).
    `keras_train_step` is unused.
    """
    del keras_train_step
    (data,) = args
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    variables = model.trainable_weights
    with torch_distributed.training_step() as several:
        if several:
            _synchronise(model)
        for variable in variables:
            variable.value.grad = None
        forward: Callable[..., Any] = model
        if _calls_directly(model):
            model._clear_losses()  # noqa: SLF001  # what the outermost `__call__` does
            forward = model.call
        y_pred, loss, logged = _forward_and_loss(
            model, x, y, sample_weight, forward, track=not several
        )
        if variables:
            loss.backward()
            gradients = [variable.value.grad for variable in variables]
            if several:
                gradients = _reduced(model, gradients, logged, x)
            with torch.no_grad():
                model.optimizer.apply(gradients, variables)
        else:
            if several:  # (the loss is logged once reduced)
                _reduced(model, [], logged, x)
            warnings.warn("The model does not have any trainable weights.", stacklevel=2)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _forward_and_loss(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any,
    forward: Callable[..., Any],
    track: bool = True,
) -> tuple[Any, Any, Any]:
    """The start of Keras' torch `train_step`: `forward(x, training=True)`, the
    loss, the loss tracker's update (by the batch's rows; not when `track` is
    False) and `scale_loss`.
    Deliberately not shared with `backends/tensorflow.py`'s twin: each follows its
    own backend's Keras trainer (here `forward` may skip `Layer.__call__`).

    Returns:
        `(y_pred, loss, logged)`: the predictions, the scaled loss to
        differentiate and the loss before scaling.
    """
    y_pred = forward(x, training=True)
    logged = model._compute_loss(  # noqa: SLF001
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )
    if track:
        model._loss_tracker.update_state(logged, sample_weight=_rows(x))  # noqa: SLF001
    loss = logged if model.optimizer is None else model.optimizer.scale_loss(logged)
    return y_pred, loss, logged


def _calls_directly(model: keras.Model) -> bool:
    """Whether the step may call `model.call` itself rather than through `Layer.__call__`.

    For a built model whose compute and variable dtypes agree, `Layer.__call__`
    adds nothing to a call on a dict of tensors but its bookkeeping (input
    conversion, a signature binding, name and autocast scopes, masks), 0.16 ms
    of the keras-rs tutorial's 1.1 ms step. The towers inside are still called as layers,
    with `training` passed explicitly.
    """
    policy = model.dtype_policy
    return model.built and policy.compute_dtype == policy.variable_dtype


def variables_replaced(layer: keras.layers.Layer) -> None:
    """Registers `layer`'s current variables as the torch parameters of it and of
    every layer inside it.

    Keras' torch layers keep a `ParameterDict` per layer holding the variables of
    the layer and all layers inside it; replacing a variable updates only the
    innermost one, so the outer ones would keep the old tensor as a parameter
    (twice the memory, and `named_parameters` / `state_dict` would list it).
    """
    # torch's own walk: it also reaches what Keras' does not list as layers (the
    # Functional model inside a `Sequential`).
    for inner in list(layer.modules()):
        if hasattr(inner, "_torch_params") and hasattr(inner, "_track_variables"):
            inner._track_variables()  # noqa: SLF001
