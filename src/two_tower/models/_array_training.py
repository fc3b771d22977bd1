"""`fit` on in-memory NumPy arrays without Keras' per-step input pipeline.

Keras feeds NumPy arrays to `fit` through its array data adapter: on
TensorFlow a `tf.data` pipeline that gathers each shuffled batch and hands it to
a step loop one element at a time, on torch a `DataLoader` whose sampler
yields the epoch's indices one by one before NumPy slices each batch. For small
models that costs more than the step itself (`benchmarks/train_speed.py`, on the
keras-rs basic retrieval tutorial's configuration: 3.7 s for 50 epochs on
TensorFlow through the adapter, 1.0 to 1.1 s here, 0.7 to 0.9 s by hand).

Here, where the backend module provides `array_train_function`, `fit` on
arrays instead:
- puts the columns on the device once per `fit` call (floats cast to `floatx`,
  as Keras' adapter does), with each pass's order of rows (a NumPy permutation,
  `random_generator`, when `shuffle=True`);
- hands Keras a step counter as its data (`backend.step_counter(steps)`: one
  element per batch of the epoch, so progress bars, callbacks,
  `steps_per_epoch` and `steps_per_execution` count exactly as for arrays);
- sets the model's `train_function` to the backend's, which gathers each step's
  batch from the device columns and runs the model's own `train_step` on it
  (torch on the CPU gathers with NumPy, on the calling thread: a gather large
  enough for torch to parallelise waits on every OpenMP thread, which a busy
  CPU makes slow; see `backends/torch.py`).

The batches are those Keras would cut from the arrays in the same row order:
`batch_size` rows each, the last one shorter. Anything else (`validation_split`,
`class_weight`, `shuffle="batch"`, `run_eagerly`, `jit_compile`, datasets,
generators, a distribution strategy) goes through Keras' own path unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from two_tower.models.retrieval_outputs import is_pair

if TYPE_CHECKING:
    from two_tower.models.two_tower_retrieval import TwoTowerRetrieval

_FIT_SIGNATURE = inspect.signature(keras.Model.fit)
_DEFAULT_BATCH_SIZE = 32  # Keras' own, for arrays


@dataclasses.dataclass
class ArrayColumns:
    """What one `fit` call trains on: `(x, y, sample_weight)` as packed arrays.

    Attributes:
        data: `x`, `(x, y)` or `(x, y, sample_weight)` of NumPy arrays, as
            `keras.utils.pack_x_y_sample_weight` packs them; floats in `floatx`.
        rows: the number of rows of every array.
        batch_size: rows per step (the last step takes the rest).
        shuffle: whether each epoch visits the rows in a fresh random order.
    """

    data: Any
    rows: int
    batch_size: int
    shuffle: bool

    @property
    def steps(self) -> int:
        """Steps in one pass over the rows."""
        return math.ceil(self.rows / self.batch_size)


def _floatx(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "f" and array.dtype != np.dtype(keras.config.floatx()):
        return array.astype(keras.config.floatx())
    return array


def columns_of(arguments: Mapping[str, Any], keras_path: bool) -> ArrayColumns | None:
    """The arrays of bound `fit` arguments, or None where Keras' own path must run
    (always when `keras_path`: a model that runs eagerly or asks for XLA itself)."""
    x = arguments.get("x")
    y = arguments.get("y")
    sample_weight = arguments.get("sample_weight")
    shuffle = arguments.get("shuffle", True)
    batch_size = arguments.get("batch_size") or _DEFAULT_BATCH_SIZE
    if (
        not is_pair(x)
        or arguments.get("validation_split")
        or arguments.get("class_weight") is not None
        or not isinstance(shuffle, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
        or keras_path
    ):
        return None
    leaves = [leaf for leaf in keras.tree.flatten((x, y, sample_weight)) if leaf is not None]
    if not all(isinstance(leaf, np.ndarray) and leaf.ndim >= 1 for leaf in leaves):
        return None
    rows = {len(leaf) for leaf in leaves}
    if len(rows) != 1 or 0 in rows:
        return None  # Keras' adapter names the mismatch
    data = keras.tree.map_structure(
        lambda leaf: None if leaf is None else _floatx(leaf),
        keras.utils.pack_x_y_sample_weight(x, y, sample_weight),
    )
    return ArrayColumns(data, rows.pop(), int(batch_size), shuffle)


def prepare(
    model: TwoTowerRetrieval, args: tuple[Any, ...], kwargs: dict[str, Any], backend: Any
) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """`fit`'s arguments with the arrays replaced by a step counter, and the train function.

    The one helper here that takes the model: its subject is the model's own train
    function, which the backend builds from the model (`array_train_function`).

    Returns:
        `(args, kwargs, train_function)`: unchanged with None where Keras' own
        path runs (see the module docstring).
    """
    if not backend.array_training:
        return args, kwargs, None
    try:
        arguments = dict(_FIT_SIGNATURE.bind(model, *args, **kwargs).arguments)
    except TypeError:
        return args, kwargs, None  # Keras raises its own error
    arguments.pop("self")
    columns = columns_of(arguments, bool(model.run_eagerly) or model.jit_compile is True)
    if columns is None:
        return args, kwargs, None
    train_function = backend.array_train_function(model, columns)
    if train_function is None:
        return args, kwargs, None
    if arguments.get("validation_batch_size") is None:
        # Keras' default is `batch_size`, which Keras no longer sees.
        arguments["validation_batch_size"] = columns.batch_size
    arguments.update(  # the train function takes the rows and shuffles them
        x=backend.step_counter(columns.steps),
        y=None,
        sample_weight=None,
        batch_size=None,
        shuffle=False,
    )
    return (), arguments, train_function


@contextlib.contextmanager
def installed(model: keras.Model, train_function: Any) -> Iterator[None]:
    """`train_function` as the model's for the duration of one `fit` call."""
    if train_function is None:
        yield
        return
    previous = model.train_function
    model.train_function = train_function
    try:
        yield
    finally:
        model.train_function = previous


def batch_rows(order: Any, step: Any, batch_size: int) -> Any:
    """The rows of `step`'s batch: a slice of the epoch's `order`."""
    start = step * batch_size
    return order[start : start + batch_size]


def random_generator(shared: Callable[[int], int] | None = None) -> np.random.Generator:
    """A NumPy generator for the epochs' row orders, seeded from NumPy's global state.

    So `keras.utils.set_random_seed` (which seeds NumPy) makes the orders repeat.
    `shared` maps the seed drawn to the one every process of a group uses
    (torch: rank 0's), so that they cut their shares from the same orders.
    """
    seed = np.random.randint(2**31 - 1)
    return np.random.default_rng(seed if shared is None else shared(seed))
