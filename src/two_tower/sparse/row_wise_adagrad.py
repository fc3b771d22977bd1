"""Row-wise Adagrad: one accumulator per row of each table (TorchRec's default)."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from two_tower import _arguments
from two_tower.types import Tensor


@keras.saving.register_keras_serializable(package="two_tower")
class RowWiseAdagrad(keras.optimizers.Optimizer):
    """Adagrad with one accumulator per row of every matrix (per element otherwise).

    For a `[rows, dim]` variable, row r keeps one accumulator `a[r]`:

        a[r] += mean(g[r] ** 2)
        w[r] -= learning_rate * g[r] / (sqrt(a[r]) + epsilon)

    As in TorchRec/FBGEMM's `EXACT_ROWWISE_ADAGRAD`, the optimizer state of an
    embedding table is one float per row instead of one per entry (a 10^7 x 64
    table needs 40 MB of state, not 2.5 GB). With `SparseEmbedding` tables in
    `TwoTowerRetrieval.fit` only the looked-up rows are updated, which equals
    the dense update, since a row with a zero gradient does not move. Variables
    of other ranks (biases, scalars) get plain per-element Adagrad with the same
    formula.

    Args:
        learning_rate: a number > 0 (NumPy scalars accepted) or a
            `keras.optimizers.schedules` schedule.
        initial_accumulator_value: starting value of every accumulator (>= 0).
        epsilon: added to the square root, for stability (>= 0; not 0 when
            `initial_accumulator_value` is 0).
        name: the optimizer's name.
        **kwargs: other `keras.optimizers.Optimizer` arguments.

    Raises:
        ValueError: a numeric `learning_rate` that is not a finite number > 0;
            an `initial_accumulator_value` or `epsilon` that is not a finite
            number >= 0; both of them 0 (a zero gradient would give 0 / 0).

    Examples:
        >>> import keras, numpy as np
        >>> model = two_tower.TwoTowerRetrieval(
        ...     two_tower.SparseEmbedding(10, 4), two_tower.SparseEmbedding(50, 4))
        >>> model.compile(optimizer=two_tower.RowWiseAdagrad(learning_rate=0.1))
        >>> x = {"query": np.array([1, 2]), "candidate": np.array([3, 4])}
        >>> history = model.fit(x, epochs=1, verbose=0)
        >>> [tuple(v.shape) for v in model.optimizer.variables[2:]]
        [(10, 1), (50, 1)]
    """

    def __init__(
        self,
        learning_rate: Any = 0.01,
        initial_accumulator_value: float = 0.0,
        epsilon: float = 1e-8,
        name: str = "row_wise_adagrad",
        **kwargs: Any,
    ) -> None:
        owner = "RowWiseAdagrad"
        if isinstance(learning_rate, (int, float, np.integer, np.floating)):
            # A Python float (Keras refuses NumPy scalars), finite and > 0: NaN
            # makes every updated row NaN, 0 trains nothing, < 0 climbs the loss.
            learning_rate = _arguments.number(
                "learning_rate", learning_rate, minimum=0, open_minimum=True, owner=owner
            )
        initial_accumulator_value = _arguments.number(
            "initial_accumulator_value", initial_accumulator_value, minimum=0, owner=owner
        )
        epsilon = _arguments.number("epsilon", epsilon, minimum=0, owner=owner)
        if epsilon == 0 and initial_accumulator_value == 0:
            raise ValueError(
                f"{owner}: `epsilon` and `initial_accumulator_value` cannot both be 0: a row "
                "whose gradient is still 0 would be updated by 0 / 0 = NaN. Received: "
                "epsilon=0, initial_accumulator_value=0. Keep the default epsilon (1e-8)."
            )
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.initial_accumulator_value = initial_accumulator_value
        self.epsilon = epsilon

    def build(self, variables: list[keras.Variable]) -> None:
        if self.built:
            return
        super().build(variables)
        self._accumulators = [
            self.add_variable(
                shape=(variable.shape[0], 1) if len(variable.shape) == 2 else variable.shape,
                initializer=keras.initializers.Constant(self.initial_accumulator_value),
                dtype=variable.dtype,
                name=f"{variable.path.replace('/', '_')}_accumulator",
            )
            for variable in variables
        ]

    def update_step(self, gradient: Tensor, variable: keras.Variable, learning_rate: Any) -> None:
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        accumulator = self._accumulators[self._get_variable_index(variable)]
        squared = ops.square(gradient)
        if len(variable.shape) == 2:
            squared = ops.mean(squared, axis=1, keepdims=True)
        self.assign_add(accumulator, squared)
        self.assign_sub(
            variable,
            ops.divide(
                ops.multiply(learning_rate, gradient),
                ops.add(ops.sqrt(accumulator), self.epsilon),
            ),
        )

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "initial_accumulator_value": self.initial_accumulator_value,
                "epsilon": self.epsilon,
            }
        )
        return config
