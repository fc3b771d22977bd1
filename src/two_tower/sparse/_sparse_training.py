"""Row-sparse training of `SparseEmbedding` tables: the backend-free part.

A backend's `sparse_train_step` (in `two_tower.backends`) runs the forward pass
under a *recorder*: each `SparseEmbedding` lookup asks the recorder for its rows,
and the recorder returns them in a form its backend can differentiate by
themselves (JAX: plus a zero "delta" argument; TensorFlow: a watched tensor;
torch: a leaf tensor), so the gradient is `[lookups, dim]`, never `[rows, dim]`.
`apply_updates` then sums each table's gradient over duplicate ids and updates
the looked-up rows and their optimizer state, writing them back with the
backend's in-place row write, and hands every other variable to the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import keras
from keras import ops

from two_tower.sparse.row_wise_adagrad import RowWiseAdagrad
from two_tower.sparse.sparse_embedding import SparseEmbedding
from two_tower.types import Tensor

SUPPORTED_OPTIMIZERS = (
    "keras.optimizers.SGD (without momentum), keras.optimizers.Adagrad, "
    "keras.optimizers.Adam (applied as lazy Adam) and two_tower.RowWiseAdagrad"
)


def sparse_tables(model: keras.layers.Layer) -> list[SparseEmbedding]:
    """The trainable `SparseEmbedding` layers inside `model`, each once."""
    layers = model._flatten_layers(include_self=False, recursive=True)  # noqa: SLF001
    found = {id(layer): layer for layer in layers if isinstance(layer, SparseEmbedding)}
    return [layer for layer in found.values() if layer.trainable]


def split_variables(model: keras.Model) -> tuple[list[SparseEmbedding], list[keras.Variable]]:
    """The model's sparse tables and its other trainable variables.

    Builds the optimizer first if it is not built yet (Keras builds it inside
    its first `apply`), over all trainable variables in Keras' order, so that
    its state is laid out as a dense model's would be.
    """
    tables = sparse_tables(model)
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    table_ids = {id(layer.embeddings) for layer in tables}
    return tables, [v for v in model.trainable_variables if id(v) not in table_ids]


def _kind(optimizer: keras.optimizers.Optimizer) -> str | None:

    for kind, cls in (
        ("row_wise_adagrad", RowWiseAdagrad),
        ("adagrad", keras.optimizers.Adagrad),
        ("adam", keras.optimizers.Adam),
        ("sgd", keras.optimizers.SGD),
    ):
        if isinstance(optimizer, cls):
            return kind
    return None


def check_optimizer(optimizer: Any) -> str:
    """The sparse rule for `optimizer`; raises on one the sparse path cannot apply.

    Raises:
        ValueError: on another optimizer, on an option whose dense meaning
            touches every row (momentum, weight decay, gradient clipping by
            norm, EMA, gradient accumulation, loss scaling, AMSGrad).
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            "SparseEmbedding tables cannot train with a LossScaleOptimizer, which Keras "
            "compiles in under the 'mixed_float16' policy: its dynamic loss scale acts on "
            "every gradient at each step. Use the 'mixed_bfloat16' policy, which needs no "
            "loss scaling, or float32. Received optimizer LossScaleOptimizer("
            f"{type(optimizer.inner_optimizer).__name__})"
        )
    kind = _kind(optimizer) if isinstance(optimizer, keras.optimizers.Optimizer) else None
    if kind is None:
        raise ValueError(
            f"SparseEmbedding tables train with {SUPPORTED_OPTIMIZERS}. Received "
            f"optimizer {type(optimizer).__name__}. Compile with one of those, or use "
            "keras.layers.Embedding (dense updates) with this optimizer."
        )
    options = {
        "momentum": getattr(optimizer, "momentum", 0) if kind == "sgd" else 0,
        "nesterov": getattr(optimizer, "nesterov", False) if kind == "sgd" else False,
        "amsgrad": getattr(optimizer, "amsgrad", False) if kind == "adam" else False,
        "weight_decay": optimizer.weight_decay,
        "clipnorm": optimizer.clipnorm,
        "clipvalue": optimizer.clipvalue,
        "global_clipnorm": optimizer.global_clipnorm,
        "use_ema": optimizer.use_ema,
        "gradient_accumulation_steps": optimizer.gradient_accumulation_steps,
        "loss_scale_factor": optimizer.loss_scale_factor,
    }
    used = {name: value for name, value in options.items() if value}
    if used:
        raise ValueError(
            f"SparseEmbedding tables cannot train with {type(optimizer).__name__} options "
            f"{used}: they act on every row of a table at each step. Supported: "
            f"{SUPPORTED_OPTIMIZERS}, without those options."
        )
    return kind


def _check_learning_rate(optimizer: keras.optimizers.Optimizer) -> None:
    """Raises on a fixed learning rate that is NaN, infinite, zero or negative.

    Read on the host when the model is compiled (not in the step, where the
    variable is traced); a schedule or callable is left alone.
    """
    value = getattr(optimizer, "_learning_rate", None)
    if not isinstance(value, keras.Variable):
        return
    learning_rate = float(ops.convert_to_numpy(value.value))
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(
            f"SparseEmbedding tables need a finite learning rate > 0. Received "
            f"{type(optimizer).__name__} with learning_rate={learning_rate!r}: the looked-up "
            "rows would become NaN, stay still or climb the loss. Pass a positive number "
            "(or a keras.optimizers.schedules schedule)."
        )


def check_model(model: keras.Model) -> None:
    """Raises when `model` has `SparseEmbedding` tables and an optimizer (or a
    learning rate) that the sparse step cannot apply (see `check_optimizer`)."""
    if getattr(model, "optimizer", None) is not None and sparse_tables(model):
        check_optimizer(model.optimizer)
        _check_learning_rate(model.optimizer)


def _sorted_sums(ids: Tensor, gradients: Tensor) -> tuple[Tensor, Tensor]:
    """Ids sorted, and at each position the sum of the gradients of its id.

    Sorting groups the duplicates of an id; a segment sum adds them. Every
    duplicate then carries the same total, so the rows computed from it are the
    same and writing all of them (in any order) writes that one value.
    """
    order = ops.argsort(ids)
    sorted_ids = ops.take(ids, order, axis=0)
    starts = ops.not_equal(sorted_ids[1:], sorted_ids[:-1])
    starts = ops.concatenate([ops.ones((1,), "int32"), ops.cast(starts, "int32")], axis=0)
    segments = ops.cumsum(starts) - 1
    count = ops.shape(ids)[0]
    sums = ops.segment_sum(ops.take(gradients, order, axis=0), segments, num_segments=count)
    return sorted_ids, ops.take(sums, segments, axis=0)


ReadRows = Callable[[keras.Variable, Tensor], Tensor]
WriteRows = Callable[[keras.Variable, Tensor, Tensor], None]


def _row_updates(
    optimizer: Any,
    kind: str,
    table: keras.Variable,
    ids: Tensor,
    gradients: Tensor,
    read_rows: ReadRows,
) -> list[tuple[keras.Variable, Tensor]]:
    """New values of the looked-up rows of `table` and of its optimizer state.

    The same arithmetic, in the same order, as the optimizer's dense
    `update_step` (Keras 3's SGD, Adagrad and Adam; `RowWiseAdagrad`), restricted
    to the rows at `ids`. The optimizer state is the optimizer's own variables,
    found as Keras' optimizers find them (`_get_variable_index`).
    """
    dtype = table.dtype
    learning_rate = ops.cast(optimizer.learning_rate, dtype)
    gradients = ops.cast(gradients, dtype)
    rows = read_rows(table, ids)
    if kind == "sgd":
        return [(table, rows - learning_rate * gradients)]
    index = optimizer._get_variable_index(table)  # noqa: SLF001
    if kind == "adagrad":
        accumulator = optimizer._accumulators[index]  # noqa: SLF001
        accumulated = read_rows(accumulator, ids) + ops.square(gradients)
        step = ops.divide(
            ops.multiply(learning_rate, gradients),
            ops.sqrt(ops.add(accumulated, optimizer.epsilon)),
        )
        return [(accumulator, accumulated), (table, rows - step)]
    if kind == "row_wise_adagrad":
        accumulator = optimizer._accumulators[index]  # noqa: SLF001
        accumulated = read_rows(accumulator, ids) + ops.mean(
            ops.square(gradients), axis=1, keepdims=True
        )
        step = ops.divide(
            ops.multiply(learning_rate, gradients),
            ops.add(ops.sqrt(accumulated), optimizer.epsilon),
        )
        return [(accumulator, accumulated), (table, rows - step)]
    # Lazy Adam: the moments of the looked-up rows only, bias-corrected with the
    # optimizer's global step as Keras' Adam (and TF Addons' LazyAdam) do.
    local_step = ops.cast(optimizer.iterations + 1, dtype)
    beta_1_power = ops.power(ops.cast(optimizer.beta_1, dtype), local_step)
    beta_2_power = ops.power(ops.cast(optimizer.beta_2, dtype), local_step)
    alpha = learning_rate * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    momentum_variable = optimizer._momentums[index]  # noqa: SLF001
    velocity_variable = optimizer._velocities[index]  # noqa: SLF001
    momentum = read_rows(momentum_variable, ids)
    velocity = read_rows(velocity_variable, ids)
    momentum = momentum + ops.multiply(ops.subtract(gradients, momentum), 1 - optimizer.beta_1)
    velocity = velocity + ops.multiply(
        ops.subtract(ops.square(gradients), velocity), 1 - optimizer.beta_2
    )
    step = ops.divide(ops.multiply(momentum, alpha), ops.add(ops.sqrt(velocity), optimizer.epsilon))
    return [(momentum_variable, momentum), (velocity_variable, velocity), (table, rows - step)]


def apply_updates(
    optimizer: Any,
    lookups: Sequence[tuple[SparseEmbedding, Tensor, Tensor]],
    dense_gradients: Sequence[Tensor | None],
    dense_variables: Sequence[keras.Variable],
    read_rows: ReadRows,
    write_rows: WriteRows,
) -> None:
    """One optimizer step: sparse rows first, then every other variable.

    Args:
        optimizer: the model's (built) optimizer; see `check_optimizer`.
        lookups: `(layer, ids, row_gradients)` per lookup made in the step, ids
            of any shape and gradients `[*ids.shape, dim]`.
        dense_gradients: gradients of `dense_variables` (None where unused).
        dense_variables: the model's trainable variables that are not tables.
        read_rows: the backend's `variable[ids]`, reading those rows only (on
            TensorFlow a full read would make the write copy the variable).
        write_rows: the backend's in-place `variable[ids] = rows`.
    """
    kind = check_optimizer(optimizer)
    tables: dict[int, tuple[SparseEmbedding, list[Tensor], list[Tensor]]] = {}
    for layer, ids, gradients in lookups:
        entry = tables.setdefault(id(layer), (layer, [], []))
        entry[1].append(ops.reshape(ops.cast(ids, "int32"), (-1,)))
        entry[2].append(ops.reshape(gradients, (-1, layer.output_dim)))
    # The learning rate and Adam's step are read before `apply` advances the
    # iteration count, so sparse rows and dense variables see the same step.
    for layer, id_parts, gradient_parts in tables.values():
        ids = id_parts[0] if len(id_parts) == 1 else ops.concatenate(id_parts, axis=0)
        gradients = (
            gradient_parts[0]
            if len(gradient_parts) == 1
            else ops.concatenate(gradient_parts, axis=0)
        )
        ids, gradients = _sorted_sums(ids, gradients)
        for variable, rows in _row_updates(
            optimizer, kind, layer.embeddings, ids, gradients, read_rows
        ):
            write_rows(variable, ids, rows)
    pairs = [(g, v) for g, v in zip(dense_gradients, dense_variables, strict=True) if g is not None]
    if pairs:
        optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])
    else:
        optimizer.iterations.assign_add(1)
