"""The hooks every backend module provides, as a type that mypy checks each module against."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # importing `two_tower.backends` must not import Keras (see `_installed`)
    import keras

    from two_tower.export._plan import ExportPlan


class BackendModule(Protocol):
    """What `two_tower.backends.{jax,tensorflow,torch}` each provide.

    Library code reaches a backend only through these, via
    `two_tower.backends.backend_module()`. A hook with nothing to do on a
    backend is the no-op of `backends/_defaults.py`, re-exported by that
    backend's module. `backends/_conformance.py` makes mypy check each module
    against this protocol.
    """

    array_training: bool
    """Whether `fit` on NumPy arrays runs through `array_train_function` (TensorFlow,
    torch); False where Keras' own path runs (JAX)."""

    max_steps_per_execution: int | None
    """The most `steps_per_execution` Keras accepts on this backend (torch: 1), or None."""

    top_k_ties_to_lower_column: bool
    """Whether `keras.ops.top_k` returns tied scores lowest column first (JAX, TF)."""

    top_k_orders_signed_zeros: bool
    """Whether `keras.ops.top_k` ranks 0.0 above -0.0 (XLA: JAX, TF); torch compares them
    as equal."""

    search_tile: int
    """Candidates `BruteForceIndex` scores at once in a tiled search (`_tiled_top_k`),
    the fastest measured on this backend (`benchmarks/retrieval.py --exact`); 0
    scores every chunk whole."""

    search_candidates_major_rows: int | None
    """From how many query rows a tiled search scores the dot product as `tile @
    queries.T` (TensorFlow: 0, always; torch: 256, where it is faster and its
    scores equal `queries @ tile.T` bit for bit), or None (JAX: never)."""

    softmax_from_log_softmax: bool
    """Whether the softmax losses take each positive's loss from `ops.log_softmax`
    (torch: one fused kernel forward and backward, 0.75x the step of `logsumexp -
    positive logit` on `benchmarks/train_speed.py --config realistic`) rather than
    `logsumexp - positive logit` (JAX, TensorFlow, where log-softmax was slower).
    The two agree up to float rounding."""

    search_rescore_einsum: bool
    """Whether a tiled search scores the chosen blocks of the dot product again
    with `einsum` (TensorFlow, where that equals `tile @ queries.T` bit for bit)
    rather than with the similarity function (JAX, torch, where `einsum` does not).
    The blocks must be chosen and ranked on the same scores
    (`tests/test_tiled_search.py` checks it on real-valued data)."""

    def export_artefact(self, model: keras.Model, plan: ExportPlan, path: str, format: str) -> None:
        """Writes `TwoTowerRetrieval.export`'s checked `plan` at `path`, tracing the query tower
        with TensorFlow: in this process on TensorFlow, in a TensorFlow child
        process elsewhere (`_export_process`)."""
        ...

    def compile_inference(
        self,
        function: Callable[[Any], Any],
        variables: Callable[[], Sequence[keras.Variable]],
    ) -> Callable[[Any], Any]:
        """`function(inputs)` compiled with the backend's compiler, reading the current
        values of `variables()` at each call, safe to call from many threads at once."""
        ...

    def keep_state_on_error(self, model: keras.Model) -> contextlib.AbstractContextManager[None]:
        """Held around `fit`, `evaluate` and `predict`: leaves the model usable when
        they raise (JAX needs it)."""
        ...

    def serving_slot(self) -> contextlib.AbstractContextManager[None]:
        """Held around each whole serving call (re-entrant): makes calls wait where
        running them all at once is slower (torch); nothing elsewhere."""
        ...

    def sparse_train_step(self, model: keras.Model, *args: Any) -> Any:
        """Keras' `train_step` for the backend (JAX takes `(state, data)`, the others
        `(data)`), with row-sparse gradients and updates for `SparseEmbedding` tables."""
        ...

    def train_step(
        self, model: keras.Model, keras_train_step: Callable[..., Any], *args: Any
    ) -> Any:
        """The model's `train_step` without `SparseEmbedding` tables: Keras' own on JAX
        (`keras_train_step`); a copy of it on TensorFlow (repeated ids' table gradients
        summed) and torch (less Python per step)."""
        ...

    def replica_loss(self, loss: Any, rows: Any, batch_rows: Any = None) -> Any:
        """The mean `loss` over `rows` (pairs; or items, weighing a replica by them),
        scaled to its share of the global batch under `tf.distribute` replicas, and
        logged as the global mean when Keras weighs it by `batch_rows` (the rows of
        x; `rows` by default); unchanged elsewhere."""
        ...

    def global_negatives(
        self, candidate_embeddings: Any, candidate_ids: Any, log_q: Any, candidate_mask: Any
    ) -> tuple[Any, Any, Any, Any, Any]:
        """Every replica's batch candidates under `tf.distribute` (with the replica's
        positive columns last); unchanged elsewhere, where the step sees the global
        batch."""
        ...

    def all_replicas(self, values: Any) -> Any:
        """`values` of every replica, concatenated on axis 0 in replica order, under
        `tf.distribute` (an all-gather); unchanged elsewhere, where the step sees the
        global batch."""
        ...

    def read_rows(self, variable: keras.Variable, ids: Any) -> Any:
        """`variable[ids]`, reading those rows only."""
        ...

    def write_rows(self, variable: keras.Variable, ids: Any, rows: Any) -> None:
        """`variable[ids] = rows` in place, in O(len(ids)) (never a copy of the variable).
        Repeated ids must carry equal rows."""
        ...

    def check_replicas(self, what: str, x: Any) -> None:
        """Raises where `what` (`"fit"`, `"evaluate"`) would hand `x`, as Keras will
        receive it, whole to each of several processes that expect their own share
        (torch: NumPy arrays on Keras' own adapter under a process group)."""
        ...

    def map_slices(self, function: Callable[[Any], Any], xs: Any) -> Any:
        """`keras.ops.map`: `function` of each slice of `xs` along axis 0, stacked.
        On torch a plain loop, which Keras' own (a scan) runs at half the speed."""
        ...

    def map_devices(self, function: Callable[[Any], Any], rows: Any, mesh: Any) -> Any:
        """A row-wise `function` applied on each device to the rows it holds (JAX's
        `shard_map`); elsewhere `function(rows)`."""
        ...

    def loop_callbacks(self) -> list[Any]:
        """Callbacks `fit` and `evaluate` add (JAX on a mesh of CPU devices)."""
        ...

    def fit_input(self, x: Any) -> Any:
        """The `x` that `fit` and `evaluate` hand Keras: a `ShardDataset` becomes a
        `tf.data` pipeline on TensorFlow; elsewhere `x` unchanged."""
        ...

    def step_counter(self, steps: int) -> Any:
        """What `fit` on arrays hands Keras as its data: the epoch's step numbers."""
        ...

    def array_train_function(self, model: keras.Model, columns: Any) -> Callable[[Any], Any] | None:
        """The train function that gathers each step's batch from device-resident
        columns, or None where Keras' own path must run."""
        ...

    def check_ids(self, ids: Any, rows: int, layer_name: str) -> Any:
        """A `SparseEmbedding`'s ids checked against `[0, rows)`: on the host when they
        have values, in the graph on TensorFlow, mapped to NaN rows in a compiled JAX
        step (JAX has no in-graph error), never to another id's row."""
        ...

    def variables_replaced(self, layer: keras.layers.Layer) -> None:
        """Called after variables inside `layer` were replaced by larger ones (tables
        grown): torch registers the new tensors as parameters of every layer."""
        ...

    def host_tensor(self, array: Any) -> Any:
        """A tensor sharing the memory of a C-contiguous, 64-byte aligned NumPy array
        on CPU (a device copy on accelerators)."""
        ...
