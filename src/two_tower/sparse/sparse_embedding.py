"""An embedding table whose training updates only the rows a batch looks up."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from two_tower import _arguments
from two_tower.backends import backend_module
from two_tower.sparse import _lookups
from two_tower.towers import _table_growth
from two_tower.towers.tower_ids import IdRange
from two_tower.types import Tensor


@keras.saving.register_keras_serializable(package="two_tower")
class SparseEmbedding(keras.layers.Layer):
    """A `keras.layers.Embedding` replacement trained with row-sparse updates.

    Inside `TwoTowerRetrieval.fit`, the gradient is taken with respect to the
    rows this layer looks up, not the whole table: duplicate ids in a batch are
    summed, and the optimizer updates those rows (and their optimizer state)
    only. A step then costs O(batch), not O(table rows): a plain `Embedding`
    trained by Keras gets a dense `[rows, dim]` gradient, and its optimizer
    touches every row on every step (see `benchmarks/table_growth.py`).

    The model's optimizer drives the update (`docs/sparse-training.md`):

    - `keras.optimizers.SGD` (no momentum) and `keras.optimizers.Adagrad` give
      exactly what they give on a dense table, since rows a batch does not
      look up have a zero gradient;
    - `two_tower.RowWiseAdagrad` keeps one accumulator per row;
    - `keras.optimizers.Adam` becomes lazy Adam: the moments of a row decay and
      update only in steps that look the row up, so it is a different algorithm
      from dense Adam (TF Addons' `LazyAdam`). A looked-up row counts as
      touched even when its gradient is zero.
    Any other optimizer or optimizer option raises when the model is compiled.
    The optimizer's state is Keras' own (e.g. Adam's moments), so it is saved
    and restored with the model.

    Differences from `keras.layers.Embedding`:

    - `embeddings_regularizer` applies to the looked-up rows (once per lookup,
      as a loss added in `call`), not to the whole table: a whole-table penalty
      costs O(rows) per step and moves every row.
    - No `embeddings_constraint`, `mask_zero`, LoRA or quantization.
    - Outside `TwoTowerRetrieval.fit` (another model, `evaluate`, serving) it
      is an ordinary embedding lookup, and a plain Keras `fit` of another model
      would train it densely.

    Ids must be integers (integer-valued floats are taken) in `[0, input_dim)`,
    and the layer checks them itself, wherever it sits in a tower:

    - ids with values (any eager call, every torch step, NumPy input) raise a
      `ValueError` naming the layer, its range and the ids received, on every
      backend;
    - in a compiled TensorFlow step an in-graph assertion raises that same
      `ValueError` from `TwoTowerRetrieval.fit`, `evaluate`, `predict` and the
      serving calls (`recommend`, `index_candidates`); XLA
      (`jit_compile=True`) drops assertions;
    - in a compiled JAX step no error can be raised without a host callback
      on every step, so there an out-of-range id, negative ones included,
      gathers a row of NaN (the loss or scores are NaN), never another id's row.

    `TwoTowerRetrieval` also checks ids on the host, before any step, when this
    layer is a whole tower or the first layer of a Sequential one.

    Args:
        input_dim: number of rows; ids run from 0 to `input_dim - 1`.
        output_dim: width of each row.
        embeddings_initializer: initializer of the table.
        embeddings_regularizer: penalty on the looked-up rows, e.g.
            `keras.regularizers.L2(1e-5)`.
        **kwargs: standard `keras.layers.Layer` arguments.

    Raises:
        ValueError: `input_dim` or `output_dim` that is not a positive integer
            (NumPy integers are accepted), an `Embedding` option it does not
            support (e.g. `mask_zero`); when called, ids that are not numbers,
            floats that are not whole, or ids outside `[0, input_dim)` (see
            above for compiled steps).

    Call arguments:
        - `ids`: integer ids of any shape.

    Call returns:
        `[*ids.shape, output_dim]` rows.

    Examples:
        >>> import keras, numpy as np
        >>> model = two_tower.TwoTowerRetrieval(
        ...     two_tower.SparseEmbedding(100, 8), two_tower.SparseEmbedding(1000, 8))
        >>> model.compile(optimizer=keras.optimizers.Adagrad(0.1))
        >>> x = {"query": np.array([1, 2, 2]), "candidate": np.array([7, 8, 9])}
        >>> history = model.fit(x, epochs=1, verbose=0)
        >>> tuple(model.candidate_tower(np.array([[7, 8]])).shape)
        (1, 2, 8)
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        embeddings_initializer: Any = "uniform",
        embeddings_regularizer: Any = None,
        **kwargs: Any,
    ) -> None:
        for name in ("embeddings_constraint", "mask_zero", "lora_rank", "weights"):
            if kwargs.get(name):
                raise ValueError(
                    f"SparseEmbedding does not support `{name}` (received "
                    f"{kwargs[name]!r}); use keras.layers.Embedding for it."
                )
            kwargs.pop(name, None)
        super().__init__(**kwargs)
        # Python ints (NumPy integers accepted), so that the config stays JSON.
        self.input_dim = _arguments.integer("input_dim", input_dim, owner="SparseEmbedding")
        self.output_dim = _arguments.integer("output_dim", output_dim, owner="SparseEmbedding")
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)
        self.autocast = False

    def build(self, input_shape: Any = None) -> None:
        self.embeddings = self.add_weight(
            shape=(self.input_dim, self.output_dim),
            initializer=self.embeddings_initializer,
            name="embeddings",
            trainable=True,
        )
        self.built = True

    def __call__(self, ids: Any, *args: Any, **kwargs: Any) -> Any:
        # Keras converts NumPy inputs before `call`, and fails on strings in each
        # backend's own words; refuse them here in ours.
        if isinstance(ids, (np.ndarray, list, tuple)):
            array = np.asarray(ids)
            self._check_dtype(array.dtype)
            _lookups.check_host_ids(array, self.name, self.input_dim)
        return super().__call__(ids, *args, **kwargs)

    def _check_dtype(self, dtype: Any) -> None:
        kind = keras.backend.standardize_dtype(dtype) if not isinstance(dtype, np.dtype) else ""
        numeric = (
            dtype.kind in "iuf"
            if isinstance(dtype, np.dtype)
            else kind.startswith(("int", "uint", "float", "bfloat"))
        )
        if not numeric:
            raise ValueError(
                f"SparseEmbedding {self.name!r} takes integer ids in [0, {self.input_dim}). "
                f"Received ids of dtype {dtype}. Map raw ids to indices first, e.g. with "
                "two_tower.Vocabulary."
            )

    def call(self, ids: Tensor) -> Tensor:
        dtype = keras.backend.standardize_dtype(ids.dtype)
        self._check_dtype(dtype)
        # Ids with values (eager calls, torch steps) are checked on the host; in
        # compiled steps TensorFlow checks them in the graph, and JAX maps
        # negative ids out of range, so that every out-of-range id gives NaN.
        ids = backend_module().check_ids(ids, self.input_dim, self.name)
        if dtype not in ("int32", "int64"):
            ids = ops.cast(ids, "int32")
        recorder = _lookups.active_recorder()
        if recorder is not None:
            rows = recorder.lookup(self, ids)
        else:
            rows = ops.take(self.embeddings, ids, axis=0)
        if self.embeddings_regularizer is not None:
            self.add_loss(self.embeddings_regularizer(rows))
        return ops.cast(rows, self.compute_dtype)

    def id_range(self) -> IdRange:
        """Ids in `[0, input_dim)`, as a tower (see `two_tower.towers.tower_ids`)."""
        return IdRange(self.input_dim, "Embedding input_dim")

    def table_sizes(self) -> int:
        """The ids the table takes: `input_dim`."""
        return self.input_dim

    def grow(self, input_dim: int) -> None:
        """Takes ids up to `input_dim`: old rows kept, new rows from the initializer.

        As a tower inside a model, grow through `TwoTowerRetrieval.grow_tables`,
        which also extends the optimizer's state.

        Raises:
            ValueError: a size below the current one, or not an integer.
        """
        new = _table_growth.checked_growth(
            f"SparseEmbedding {self.name!r}", self.input_dim, input_dim
        )
        if self.built:
            _table_growth.grow_embedding(self, self.input_dim, new, new)
            backend_module().variables_replaced(self)
        self.input_dim = new

    def check_feature_ranges(self, features: Any, where: str = "features") -> None:
        """Nothing beyond `id_range`: the model checks the ids against it."""
        del features, where

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return (*tuple(input_shape), self.output_dim)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "input_dim": self.input_dim,
                "output_dim": self.output_dim,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
                "embeddings_regularizer": keras.regularizers.serialize(self.embeddings_regularizer),
            }
        )
        return config
