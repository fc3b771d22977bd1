"""`TwoTowerRetrieval`'s Keras training methods: `compile`, `fit`, `evaluate`, `predict`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from two_tower.backends import backend_module
from two_tower.distribution import _sharding
from two_tower.models import _array_training, _input_checks, _serving
from two_tower.models.retrieval_outputs import CANDIDATE, QUERY
from two_tower.models.retrieval_outputs import is_pair as _is_pair
from two_tower.models.retrieval_task import LOSSES
from two_tower.retrieval._catalogue_store import is_batches
from two_tower.sparse import _sparse_training

# mypy sees Keras' `Model` as the base (for `super()`); at run time the mixin is plain.
_Base: Any = keras.Model if TYPE_CHECKING else object


class Training(_Base):
    """Keras' training methods, checked and adapted for two towers.

    A mixin of `TwoTowerRetrieval` (before `keras.Model` in its bases): the
    checks of what `compile`, `fit`, `evaluate` and `predict` receive, the
    backend's train step, and the `FactorizedTopK` metrics of evaluation steps.
    """

    def _encoded_pairs(self, x: Any) -> Any:
        """A pair dict of NumPy-like raw features, encoded; anything else as it is."""
        if not _is_pair(x) or (self.query_vocabulary is None and self.candidate_vocabulary is None):
            return x
        leaves = keras.tree.flatten({key: x[key] for key in (QUERY, CANDIDATE)})
        if not all(isinstance(leaf, (np.ndarray, list, tuple)) for leaf in leaves):
            return x
        encoded = dict(x)
        encoded[QUERY] = self._encode(QUERY, x[QUERY], "x['query']")
        encoded[CANDIDATE] = self._encode(CANDIDATE, x[CANDIDATE], "x['candidate']")
        return encoded

    def compile(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("loss") is not None or (len(args) > 1 and args[1] is not None):
            raise ValueError(
                f"Pass the loss to TwoTowerRetrieval(loss=...) (one of {LOSSES}), "
                "not to compile(); the retrieval loss needs both towers' embeddings."
            )
        if len(args) > 2:
            raise TypeError("Pass compile arguments after `optimizer` by keyword.")
        retrieval_metrics = _input_checks.retrieval_metrics(
            kwargs.pop("metrics", None), kwargs.get("weighted_metrics"), self.catalogue_size
        )
        names = [m.name for m in retrieval_metrics]
        super().compile(*args, **kwargs)
        self._array_trainer = None  # `fit` on arrays compiles its steps again
        _sparse_training.check_model(self)
        # Assigned after compile so that Keras tracks them as this model's metrics.
        self.retrieval_metrics = retrieval_metrics
        # Their exclusion tables are not in their configs, so they are not saved;
        # their names are, so that loading can say so (`compile_from_config`).
        self._compile_config.config["retrieval_metric_names"] = names

    def compute_metrics(
        self, x: Any, y: Any, y_pred: Any, sample_weight: Any = None
    ) -> dict[str, Any]:
        evaluating = isinstance(y_pred, Mapping) and "metrics_catalogue_embeddings" in y_pred
        if evaluating:
            query_ids = x[QUERY]
            if isinstance(query_ids, Mapping):
                # Metrics that need ids raise a clear error when there are none.
                query_ids = query_ids.get(self.query_id_key) if self.query_id_key else None
            for metric in self.retrieval_metrics:
                metric.update_state(
                    y_pred["query_embeddings"],
                    y_pred["metrics_catalogue_embeddings"],
                    y_pred["candidate_ids"],
                    query_ids=query_ids,
                    similarity_fn=self.compute_similarities,
                )
        results: dict[str, Any] = super().compute_metrics(x, y, y_pred, sample_weight)
        if not evaluating:
            # Training steps do not rank the catalogue; leave their zeros out of the logs.
            prefixes = tuple(f"{m.name}_" for m in self.retrieval_metrics)
            results = {k: v for k, v in results.items() if not k.startswith(prefixes)}
        return results

    def train_step(self, *args: Any) -> Any:
        # `SparseEmbedding` tables need the backend's row-sparse step (JAX passes
        # `(state, data)`, the others `(data)`); otherwise the backend's step,
        # Keras' own or a leaner copy of it (see `two_tower.backends`).
        if _sparse_training.sparse_tables(self):
            return backend_module().sparse_train_step(self, *args)
        return backend_module().train_step(self, super().train_step, *args)

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        return self._run_loop("fit", super().fit, args, kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        return self._run_loop("evaluate", super().evaluate, args, kwargs)

    def _run_loop(self, what: str, loop: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
        """Checks and prepares `fit`/`evaluate` inputs, then runs Keras' `loop`."""
        args, kwargs = _input_checks.fit_arguments(what, args, kwargs)
        if not kwargs.get("_use_cached_eval_dataset"):
            # (Keras' fit evaluates its validation data, already encoded, that way.)
            args, kwargs = _input_checks.replace_x(args, kwargs, self._encoded_pairs)
        if what == "fit":
            args, kwargs = _input_checks.replace_validation_x(args, kwargs, self._encoded_pairs)
        _input_checks.check_fit_arguments(
            what,
            args,
            kwargs,
            self.loss_name,
            (self._tower_side(QUERY), self._tower_side(CANDIDATE)),
            self.retrieval_metrics,
        )
        self._build_towers(args[0] if args else kwargs.get("x"))
        args, kwargs = _input_checks.for_backend(what, args, kwargs, backend_module())
        train_function = None
        if what == "fit":
            args, kwargs, train_function = _array_training.prepare(
                self, args, kwargs, backend_module()
            )
        backend_module().check_replicas(what, args[0] if args else kwargs.get("x"))
        with (
            backend_module().keep_state_on_error(self),
            _array_training.installed(self, train_function),
        ):
            return loop(*args, **kwargs)

    def predict(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(x, Mapping) and QUERY in x and not _is_pair(x):
            raise ValueError(
                "predict takes query features alone, or x = {'query': ..., 'candidate': ...} "
                f"for both embeddings. Received x with keys {sorted(map(str, x))}"
            )
        if _is_pair(x):
            x = _input_checks.lists_as_arrays(self._encoded_pairs(x), "x")
            _input_checks.check_ids(self._tower_side(QUERY), x[QUERY], "x['query']")
            _input_checks.check_candidates(
                self.query_tower, x[QUERY], self._tower_side(CANDIDATE), x[CANDIDATE]
            )
            self._build_towers(x)
        else:
            if not is_batches(x):
                x = _input_checks.lists_as_arrays(self._encode(QUERY, x, "x"), "x")
                self._check_structure(x, QUERY, "x")
            _input_checks.check_ids(self._tower_side(QUERY), x, "x")
            self._build_towers({QUERY: x})
        self._predicting = True
        try:
            with backend_module().keep_state_on_error(self):
                return super().predict(x, *args, **kwargs)
        finally:
            self._predicting = False

    def _build_towers(self, x: Any) -> None:
        """Builds unbuilt towers eagerly on one row of NumPy-like inputs.

        Otherwise the towers create their variables inside Keras' first compiled
        step; on TensorFlow, a step that then fails leaves them broken for good.
        """
        if isinstance(x, keras.utils.PyDataset) and x.num_batches:
            x = x.peek() if hasattr(x, "peek") else x[0]  # a ShardDataset's first row
            x = x[0] if isinstance(x, tuple) else x
        _sharding.check_shardable([self.query_tower, self.candidate_tower])
        if not isinstance(x, Mapping):
            return
        strategy = getattr(self, "_distribute_strategy", None)  # set under tf.distribute
        # In the strategy's scope, as Keras' fit is: a model made in the scope
        # may be fit outside it (the usual tf.distribute pattern).
        if _input_checks.predicts_every_position(self.query_tower, x.get(QUERY)):
            x = {**x, CANDIDATE: _input_checks.flat_positions(x[CANDIDATE], self.candidate_id_key)}
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            for key, tower, embed in (
                (QUERY, self.query_tower, self.embed_queries),
                (CANDIDATE, self.candidate_tower, self.embed_candidates),
            ):
                leaves = keras.tree.flatten(x.get(key))
                if leaves and all(
                    isinstance(leaf, (np.ndarray, list, tuple)) and np.ndim(leaf) > 0 and len(leaf)
                    for leaf in leaves
                ):
                    _serving.build_eagerly(tower, embed, x[key])
            cache = getattr(self, "negative_cache", None)
            if (
                cache is not None
                and not cache.built
                and self.candidate_tower.built
                and x.get(CANDIDATE) is not None
            ):
                # Its rows are the candidate embeddings: their dim, from one row.
                row = keras.tree.map_structure(lambda a: np.asarray(a)[:1], x[CANDIDATE])
                cache.build(self.embed_candidates(row).shape)
        if strategy is not None and self.query_tower.built and self.candidate_tower.built:
            # Keras' TensorFlow trainer otherwise builds the model from the
            # replicas' MEAN batch, where the ids are floats.
            self.built = True

    def compile_from_config(self, config: dict[str, Any]) -> None:
        # Keras' default skips compiling on load when `compile` is overridden; ours
        # only adds a check, so compile as the default would.
        from two_tower.saving._compile_config import loadable_compile_config

        self.compile(**loadable_compile_config(config))
        if self.built and self.optimizer is not None:
            self.optimizer.build(self.trainable_variables)

    def save(
        self, filepath: Any, overwrite: bool = True, zipped: bool | None = None, **kwargs: Any
    ) -> None:
        """Saves the model as a `.keras` file, atomically (see `two_tower.saving.save_model`).

        Raises:
            ValueError: an `.h5` / `.hdf5` path, which would lose the index.
        """
        from two_tower import saving

        if isinstance(filepath, (str, os.PathLike)) and str(os.fspath(filepath)).endswith(
            (".h5", ".hdf5")
        ):
            raise ValueError(
                "TwoTowerRetrieval saves to `.keras` files: a legacy `.h5` file loses the "
                f"index and cannot rebuild the model. Received filepath={filepath!r}"
            )
        saving.save_model(self, filepath, overwrite=overwrite, zipped=zipped, **kwargs)
