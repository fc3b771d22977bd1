"""Backend-specific machinery, chosen once from `keras.backend.backend()`.

Each module here speaks to one backend's own engine and is imported lazily, only
by the process that runs on that backend. Library code elsewhere calls
`backend_module()` and never imports a backend itself.

Every module provides:
- `compile_inference(function, variables)`: `function(inputs)` compiled with the
  backend's compiler, reading the current values of `variables()` at each call
  and safe to call from many threads at once (see each module's docstring);
- `keep_state_on_error(model)`: a context manager around `fit`, `evaluate` and
  `predict` that leaves the model usable when they raise (JAX needs it);
- `serving_slot()`: a context manager held around each whole serving call
  (re-entrant); it makes calls wait where running them all at once is slower
  (torch), and does nothing elsewhere;
- `sparse_train_step(model, *args)`: Keras' `train_step` for that backend (JAX
  takes `(state, data)`, the others `(data)`), with row-sparse gradients and
  updates for `SparseEmbedding` tables (see `two_tower.sparse._sparse_training`);
- `replica_loss(loss, rows)`: the loss `compute_loss` returns for a batch of
  `rows`, scaled to its share of the global batch under data-parallel replicas
  (TensorFlow's `tf.distribute`); unchanged elsewhere;
- `global_negatives(candidate_embeddings, candidate_ids, log_q)`: the batch
  candidates of every replica in sync, for in-batch softmax under TensorFlow's
  `tf.distribute` (with the replica's positive columns); unchanged elsewhere,
  where the step already sees the global batch;
- `check_replicas()`: raises where training would silently run as several
  independent copies (a torch process group); nothing elsewhere;
- `map_devices(function, rows, mesh)`: a row-wise `function` applied on each
  device to the rows it holds of `rows` (axis 0 spread over every axis of the
  `keras.distribution.DeviceMesh`), inside a compiled step (JAX's `shard_map`:
  XLA would otherwise gather the rows for ops it cannot split, such as
  `top_k`); elsewhere `function(rows)`;
- `loop_callbacks()`: callbacks `fit` and `evaluate` add (JAX on a mesh of CPU
  devices: one compiled call in flight, see `backends/jax.py`); elsewhere none;
- `fit_input(x)`: the `x` that `fit` and `evaluate` hand to Keras: a
  `ShardDataset` becomes a `tf.data` pipeline on TensorFlow (Keras would feed
  it through a Python generator, one call per batch); elsewhere `x` unchanged.
- `train_step(model, keras_train_step, *args)`: the model's `train_step` when it
  has no `SparseEmbedding` table: Keras' own on JAX (`keras_train_step`), a copy
  of it on TensorFlow whose table gradients have repeated ids summed (dense for
  small tables) and on torch one with less Python per step;
- `step_counter(steps)` and `array_train_function(model, columns)` (TensorFlow
  and torch only): what `fit` on NumPy arrays hands Keras instead of the arrays
  (the epoch's step numbers) and the train function that gathers each step's
  batch from device-resident columns (see `two_tower.models._array_training`); None
  where Keras' own path must run;
- `check_ids(ids, rows, layer_name)`: a `SparseEmbedding`'s ids checked against
  `[0, rows)` wherever the layer sits in its tower: on the host when they have
  values (every backend, and every torch step), in the graph on TensorFlow (its
  error re-raised as the same `ValueError` by `keep_state_on_error`), and inside a
  compiled JAX step mapped to rows of NaN (JAX has no in-graph error), never to
  another id's row;
- `host_tensor(array)`: a tensor of a C-contiguous NumPy array aligned to 64
  bytes that shares its memory on CPU (`jax.device_put`, `torch.from_numpy`,
  TensorFlow's DLPack import), so an index holds one copy of its catalogue
  (`keras.ops.convert_to_tensor` copies on every backend); a device copy on
  accelerators. The array must not change afterwards.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {
    "jax": "two_tower.backends.jax",
    "tensorflow": "two_tower.backends.tensorflow",
    "torch": "two_tower.backends.torch",
}


def backend_module() -> ModuleType:
    """The module of the backend Keras runs on.

    Raises:
        NotImplementedError: on a backend two_tower does not support (e.g. numpy).
    """
    import keras  # not at import time: `_installed` must run before Keras is imported

    backend = keras.backend.backend()
    if backend not in _MODULES:
        raise NotImplementedError(
            f"two_tower supports the jax, tensorflow and torch backends. Keras runs on "
            f"{backend!r}; set KERAS_BACKEND to one of {sorted(_MODULES)}."
        )
    return importlib.import_module(_MODULES[backend])
