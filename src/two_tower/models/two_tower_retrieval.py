"""The two-tower retrieval model."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from two_tower.backends import backend_module
from two_tower.distribution import _sharding
from two_tower.metrics.factorized_top_k import FactorizedTopK
from two_tower.models import _array_training, _input_checks, _serving, _vocabularies
from two_tower.models.retrieval_outputs import (
    CANDIDATE,
    QUERY,
    SAMPLING_PROBABILITY,
    RetrievalOutputs,
)
from two_tower.models.retrieval_outputs import is_pair as _is_pair
from two_tower.models.retrieval_task import CATALOGUE_LOSSES, LOSSES, RetrievalTask
from two_tower.preprocessing.vocabulary import Vocabulary
from two_tower.retrieval.brute_force_index import BruteForceIndex
from two_tower.sparse import _sparse_training
from two_tower.types import Tensor


def _input_spec(inputs: Any) -> Any:
    """Shape and dtype of each input, batch dim dropped, as JSON-friendly strings."""

    def leaf(tensor: Any) -> str:
        dims = ",".join("None" if d is None else str(int(d)) for d in tensor.shape[1:])
        return f"{keras.backend.standardize_dtype(tensor.dtype)}|{dims}"

    return keras.tree.map_structure(leaf, inputs)


def _symbolic_inputs(spec: Any) -> Any:
    def leaf(text: str) -> Any:
        dtype, dims = text.split("|")
        shape = tuple(None if d == "None" else int(d) for d in dims.split(",") if d)
        return keras.KerasTensor((None, *shape), dtype=dtype)

    return keras.tree.map_structure(leaf, spec)


@keras.saving.register_keras_serializable(package="two_tower")
class TwoTowerRetrieval(keras.Model):
    """A two-tower retrieval model: a query tower, a candidate tower and a top-k index.

    The query tower maps query features (a tensor, or a dict of tensors) to
    `[batch, dim]` embeddings; the candidate tower does the same for candidates.
    Any Keras layer or model works as a tower. A query and a candidate are scored
    by the dot product of their embeddings. After training, `index_candidates`
    embeds the catalogue, `recommend` returns the top-k candidate ids (leaving out
    any `exclude=` ids per query), and `similar_items` does item-to-item.

    **Data.** `fit` and `evaluate` take `x = {"query": query_features,
    "candidate": candidate_features}`: row i of each is one observed pair.
    `predict` and `recommend` take query features alone (`predict` also accepts the
    pair dict and then returns `{"query_embeddings", "candidate_embeddings"}`).

    **Losses.**

    - `"mse"`: squared error between a label `y` (e.g. a rating scaled to
      [0, 1]) and the pair's score; the keras-rs basic-retrieval tutorial's loss.
    - `"full_softmax"` / `"sampled_softmax"`: the positive against every
      catalogue candidate, or against the batch plus `num_sampled_negatives`
      uniform samples. The candidate tower embeds catalogue ids
      `0..catalogue_size-1`; a tower over a dict of features needs
      `set_catalogue(features)` first (row i holds candidate id i's features).
    - `"softmax"`: in-batch softmax. Row i's candidate is the positive; the other
      candidates in the batch are negatives. Logits are divided by
      `temperature`. With `remove_accidental_hits`, other rows holding the same
      candidate id are masked out (ids come from the candidate input, or its
      `candidate_id_key` feature). An optional
      `x["candidate_sampling_probability"]` (`[batch]`, the chance of each
      candidate appearing in a batch) applies the logQ correction (also to the
      batch part of `"sampled_softmax"`; `"mse"` and `"full_softmax"` refuse it).
      `num_hard_negatives` keeps only the hardest negatives of each row. It
      takes no labels. To weight pairs, feed a dataset or generator of
      `(x, None, sample_weight)`: Keras drops `sample_weight` passed beside
      `y=None` as arrays, so `fit`/`evaluate` raise on that instead.

    **Raw ids.** With `query_vocabulary` / `candidate_vocabulary`, the model
    carries its `two_tower.Vocabulary` lookups, saved in the `.keras` file, and
    takes raw values (strings, int64 ids) wherever it takes NumPy-like
    features: `fit`, `evaluate`, `predict`, `recommend`, `similar_items`,
    `index_candidates` and `set_catalogue`. Datasets, generators and
    `PyDataset`s are read as they come: they must yield the towers' inputs
    (indices), e.g. from `encode_queries` / `encode_candidates`.
    `index_candidates()` then indexes every known candidate under its raw id, so
    `recommend` and `similar_items` return raw ids (and take raw ids in
    `exclude`). Unknown values follow the vocabulary's rule: an unknown query
    value goes to its OOV bucket (a learned row: with `adapt(min_count=2)` it is
    trained on the rare users); an unknown candidate id raises in
    `index_candidates` and `similar_items` when the candidate tower takes ids
    alone, since it has no embedding of its own (with dict features it goes to
    its OOV bucket like any feature value, and the other features describe it).
    `FactorizedTopK` metrics and their exclusions work in indices.

    **Row-sparse tables.** When the towers hold `two_tower.SparseEmbedding` tables
    (e.g. `IdEmbeddingTower(sparse=True)`), `fit` runs the backend's row-sparse
    step: those tables' gradients and optimizer updates touch the looked-up rows
    only (see `SparseEmbedding` and `docs/sparse-training.md`).

    The loss is chosen here, not in `compile`: `compile(loss=...)` raises. It is
    stored as `loss_name`, because `keras.Model` reserves the `loss` attribute.
    Regularisation losses of the towers (`self.losses`) are added.

    **Overriding.** A subclass can change:

    - `compute_similarities(query_embeddings, candidate_embeddings)`: the
      `[queries, candidates]` score matrix used by the softmax loss and by
      retrieval (so training and serving score the same way).
    - `compute_scores(query_embeddings, candidate_embeddings)`: the `[batch]`
      scores of aligned pairs, used by the MSE loss.
    - `compute_retrieval_loss(labels, outputs, sample_weight)`: the loss from the
      dict that `call` returns.
    - `call(inputs, training)`: with pair inputs it must return a dict holding at
      least `"query_embeddings"` and `"candidate_embeddings"`; with query inputs it
      returns the `[batch, dim]` query embeddings.

    **Serialization.** `get_config` stores both towers, the loss, the temperature
    and the index layer. A `.keras` file saved after `index_candidates` holds the
    index, so `keras.saving.load_model` returns a model that can `recommend` at
    once. The towers must themselves be serializable (registered custom layers,
    or built-in Keras layers and models).

    Args:
        query_tower: layer or model mapping query features to `[batch, dim]`.
        candidate_tower: layer or model mapping candidate features to
            `[batch, dim]`, with the same `dim`.
        loss: one of `"mse"`, `"softmax"`, `"sampled_softmax"`, `"full_softmax"`.
        temperature: logits divisor of the softmax loss; must be > 0.
        remove_accidental_hits: mask in-batch duplicates of each row's positive
            (`"softmax"` and `"sampled_softmax"`; the other losses refuse it).
        num_hard_negatives: keep only this many highest-scoring negatives per
            row (the softmax losses; `"mse"` refuses it); None keeps all.
        candidate_id_key: with dict candidate features, the feature holding the
            candidate id (for `remove_accidental_hits`, the catalogue losses and
            `FactorizedTopK` metrics).
        catalogue_size: number of candidate ids (ids run from 0 to
            `catalogue_size - 1`); needed by the catalogue losses and metrics.
        num_sampled_negatives: uniform negatives per batch for
            `"sampled_softmax"`.
        query_id_key: with dict query features, the feature holding the query
            id (for `FactorizedTopK` recall and exclusions, and the id checks).
        candidate_index: the top-k index; defaults to a new `BruteForceIndex`.
        query_vocabulary: a `two_tower.Vocabulary` of raw query ids (for a
            query tower over one id array), or a dict feature name ->
            `Vocabulary` (for a tower over a dict of features; other features
            pass through). Its values must be set (`adapt` first).
        candidate_vocabulary: the same for candidates. For an id tower its
            `size` must not exceed the tower's ids (nor `catalogue_size`).
        cross_replica_negatives: under a `tf.distribute` strategy, each replica's
            in-batch (and sampled-softmax batch) negatives are the whole global
            batch's candidates, gathered across replicas, as on one device. False
            keeps each replica's own candidates only: cheaper, but a different
            loss (see `docs/distributed.md`). JAX distributions always see the
            global batch.
        **kwargs: standard `keras.Model` arguments (`name`, ...).

    Raises:
        TypeError: a tower that is not a Keras layer.
        ValueError: an unknown loss; a temperature that is not a finite
            positive number; a catalogue loss without `catalogue_size`, or a `catalogue_size`
            above the candidate tower's ids; `"sampled_softmax"` without
            `num_sampled_negatives`; options that the loss does not use. In `fit`,
            `evaluate` and `predict` on pairs: towers whose output dims differ.

    Examples:
        >>> import keras, numpy as np
        >>> model = two_tower.TwoTowerRetrieval(
        ...     query_tower=keras.layers.Embedding(10, 4),
        ...     candidate_tower=keras.layers.Embedding(20, 4),
        ...     loss="softmax",
        ... )
        >>> model.compile(optimizer="adam")
        >>> x = {"query": np.arange(8) % 10, "candidate": np.arange(8) % 20}
        >>> history = model.fit(x, batch_size=4, epochs=1, verbose=0)
        >>> model.index_candidates(np.arange(20), candidate_ids=np.arange(20) + 100)
        >>> model.recommend(np.array([3]), k=5).shape
        (1, 5)
    """

    def __init__(
        self,
        query_tower: keras.layers.Layer,
        candidate_tower: keras.layers.Layer,
        loss: str = "softmax",
        temperature: float = 1.0,
        remove_accidental_hits: bool = False,
        num_hard_negatives: int | None = None,
        candidate_id_key: str | None = None,
        catalogue_size: int | None = None,
        num_sampled_negatives: int | None = None,
        candidate_index: BruteForceIndex | None = None,
        query_id_key: str | None = None,
        cross_replica_negatives: bool = True,
        query_vocabulary: Vocabulary | Mapping[str, Vocabulary] | None = None,
        candidate_vocabulary: Vocabulary | Mapping[str, Vocabulary] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, tower in (("query_tower", query_tower), ("candidate_tower", candidate_tower)):
            if not isinstance(tower, keras.layers.Layer):
                raise TypeError(
                    f"`{name}` must be a keras Layer or Model. "
                    f"Received: {tower!r} of type {type(tower).__name__}"
                )
        # The loss and its negatives (the model keeps the sampler's seed, a variable).
        self.task = RetrievalTask(
            loss=loss,
            temperature=temperature,
            remove_accidental_hits=remove_accidental_hits,
            num_hard_negatives=num_hard_negatives,
            catalogue_size=catalogue_size,
            num_sampled_negatives=num_sampled_negatives,
            cross_replica_negatives=cross_replica_negatives,
            candidate_id_key=candidate_id_key,
            candidate_id_limit=_input_checks.tower_id_limit(candidate_tower, CANDIDATE),
        )
        self.query_vocabulary = _vocabularies.check(
            query_vocabulary, "query_vocabulary", _input_checks.tower_id_limit(query_tower, QUERY)
        )
        self.candidate_vocabulary = _vocabularies.check(
            candidate_vocabulary,
            "candidate_vocabulary",
            _input_checks.tower_id_limit(candidate_tower, CANDIDATE),
        )
        candidate_ids = _vocabularies.id_vocabulary(self.candidate_vocabulary, candidate_id_key)
        if (
            candidate_ids is not None
            and catalogue_size is not None
            and (candidate_ids.size > catalogue_size)
        ):
            raise ValueError(
                f"`candidate_vocabulary` maps to {candidate_ids.size} indices (OOV buckets "
                f"included), more than catalogue_size={catalogue_size}."
            )
        self.query_tower = query_tower
        self.candidate_tower = candidate_tower
        share = getattr(query_tower, "share_candidate_items", None)
        if callable(share):  # a HistoryTower embeds its history with the candidates' table
            share(candidate_tower, candidate_id_key)
        self.candidate_id_key = candidate_id_key
        self.query_id_key = query_id_key
        self._predicting = False  # set by predict: pair inputs return the embeddings only
        self._catalogue_features: dict[str, keras.Variable] = {}
        self._negative_seed = keras.random.SeedGenerator(seed=0, name="negative_sampler")
        self.retrieval_metrics: list[FactorizedTopK] = []
        self.candidate_index = candidate_index or BruteForceIndex(name="candidate_index")
        self._query_input_spec: Any = None
        self._candidate_input_spec: Any = None
        # Serving's compiled tower functions (see `_serving`); not tracked by Keras.
        object.__setattr__(self, "_serving_functions", {})

    # The task's options, read-only here (set them through the constructor).
    loss_name = property(lambda self: self.task.loss, doc="The loss (`loss=`).")
    temperature = property(lambda self: self.task.temperature)
    remove_accidental_hits = property(lambda self: self.task.remove_accidental_hits)
    num_hard_negatives = property(lambda self: self.task.num_hard_negatives)
    catalogue_size = property(lambda self: self.task.catalogue_size)
    num_sampled_negatives = property(lambda self: self.task.num_sampled_negatives)
    cross_replica_negatives = property(lambda self: self.task.cross_replica_negatives)

    def build(self, input_shape: Any = None) -> None:
        # The towers build themselves on their first call, which sees the real
        # input dtypes (Keras' default build would trace them with float32).
        self.built = True

    @classmethod
    def from_ids(
        cls,
        num_queries: int | None = None,
        num_candidates: int | None = None,
        embedding_dim: int | None = None,
        l2: float | None = None,
        temperature: float | None = None,
        sparse: bool | None = None,
        query_vocabulary: Vocabulary | None = None,
        candidate_vocabulary: Vocabulary | None = None,
        **kwargs: Any,
    ) -> TwoTowerRetrieval:
        """The tuned softmax configuration over integer query and candidate ids.

        Builds `IdEmbeddingTower` towers (the candidate side with a learned bias)
        and a full-catalogue softmax, with the defaults of `two_tower.defaults`.
        Train it with `compile(optimizer=two_tower.defaults.optimizer())` and
        `fit(x, **two_tower.defaults.FIT)`.

        With vocabularies, the model takes raw ids (see "Raw ids" above) and
        the table sizes default to the vocabularies' `size`.

        Args:
            num_queries: query ids run from 0 to `num_queries - 1`; defaults
                to `query_vocabulary.size`.
            num_candidates: candidate ids run from 0 to `num_candidates - 1`;
                defaults to `candidate_vocabulary.size`.
            embedding_dim: defaults to `defaults.EMBEDDING_DIM`.
            l2: defaults to `defaults.L2`.
            temperature: defaults to `defaults.TEMPERATURE`.
            sparse: row-sparse tables (`IdEmbeddingTower(sparse=True)`);
                defaults to `defaults.SPARSE`.
            query_vocabulary: a `two_tower.Vocabulary` of raw query ids.
            candidate_vocabulary: a `two_tower.Vocabulary` of raw candidate ids.
            **kwargs: other `TwoTowerRetrieval` arguments (e.g. `loss`).

        Returns:
            An uncompiled `TwoTowerRetrieval`.

        Raises:
            ValueError: a size that is neither given nor implied by a
                vocabulary, or the arguments' own errors.

        Examples:
            >>> import numpy as np
            >>> users = two_tower.Vocabulary(["ann", "bob"])
            >>> items = two_tower.Vocabulary(["x", "y", "z"])
            >>> model = two_tower.TwoTowerRetrieval.from_ids(
            ...     query_vocabulary=users, candidate_vocabulary=items)
            >>> model.compile(optimizer=two_tower.defaults.optimizer())
            >>> x = {"query": np.array(["ann", "bob"]), "candidate": np.array(["y", "z"])}
            >>> history = model.fit(x, epochs=1, verbose=0)
            >>> model.index_candidates()
            >>> model.recommend(["ann"], k=2, exclude=[["y"]]).dtype.kind
            'U'
        """
        from two_tower import defaults
        from two_tower.towers.id_embedding_tower import IdEmbeddingTower

        sizes = {}
        for name, size, vocabulary in (
            ("num_queries", num_queries, query_vocabulary),
            ("num_candidates", num_candidates, candidate_vocabulary),
        ):
            side = "query" if name == "num_queries" else "candidate"
            if vocabulary is not None and not isinstance(vocabulary, Vocabulary):
                raise ValueError(
                    f"from_ids: `{side}_vocabulary` must be a two_tower.Vocabulary (adapted "
                    f"to the raw ids) or None. Received {type(vocabulary).__name__}: "
                    f"{vocabulary!r:.80}. Build one with `Vocabulary()` and `adapt(ids)`."
                )
            if size is None and isinstance(vocabulary, Vocabulary):
                size = vocabulary.size
            if size is None:
                raise ValueError(
                    f"from_ids needs `{name}`, or a vocabulary whose size gives it. Received "
                    f"{name}=None and no vocabulary."
                )
            sizes[name] = size
        num_queries, num_candidates = sizes["num_queries"], sizes["num_candidates"]
        dim = defaults.EMBEDDING_DIM if embedding_dim is None else embedding_dim
        penalty = defaults.L2 if l2 is None else l2
        sparse = defaults.SPARSE if sparse is None else sparse
        kwargs.setdefault("loss", defaults.LOSS)
        if kwargs["loss"] in CATALOGUE_LOSSES:
            kwargs.setdefault("catalogue_size", num_candidates)
        return cls(
            query_tower=IdEmbeddingTower(
                num_queries, dim, l2=penalty, bias="constant", sparse=sparse, name="query_tower"
            ),
            candidate_tower=IdEmbeddingTower(
                num_candidates,
                dim,
                l2=penalty,
                bias="learned",
                sparse=sparse,
                name="candidate_tower",
            ),
            temperature=defaults.TEMPERATURE if temperature is None else temperature,
            query_vocabulary=query_vocabulary,
            candidate_vocabulary=candidate_vocabulary,
            **kwargs,
        )

    # ----------------------------------------------------------------- towers
    def encode_queries(self, query_features: Any) -> Any:
        """Raw query features as the query tower's inputs, through `query_vocabulary`.

        The model does this itself for NumPy-like inputs; call it to prepare
        the batches of a dataset or generator, which are read as they come.

        Args:
            query_features: an array-like of raw values, or a dict of them.

        Returns:
            NumPy indices (int32) for the looked-up features; the other
            features, and everything without a `query_vocabulary`, unchanged.

        Raises:
            ValueError: features of the wrong structure or kind for the
                vocabularies (see `two_tower.Vocabulary`).
        """
        return self._encode(QUERY, query_features, "`query_features`")

    def encode_candidates(self, candidate_features: Any) -> Any:
        """Raw candidate features as the candidate tower's inputs (see `encode_queries`).

        Args:
            candidate_features: an array-like of raw values, or a dict of them.

        Returns:
            The features with `candidate_vocabulary`'s looked up.

        Raises:
            ValueError: features of the wrong structure or kind for the
                vocabularies.
        """
        return self._encode(CANDIDATE, candidate_features, "`candidate_features`")

    def _encode(self, side: str, features: Any, argument: str) -> Any:
        """`side`'s raw features looked up, errors naming the caller's `argument`."""
        if side == QUERY:
            return _vocabularies.encode(
                self.query_vocabulary, features, argument, "query_vocabulary"
            )
        return _vocabularies.encode(
            self.candidate_vocabulary, features, argument, "candidate_vocabulary"
        )

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

    def _catalogue_rows(self, ids: Any, argument: str) -> tuple[dict[str, np.ndarray], Any]:
        """The `set_catalogue` rows of candidate `ids` (raw ids with a vocabulary of
        the `candidate_id_key`, else indices), and the ids; O(len(ids)) on the device."""
        ids = np.asarray(ids)
        vocabulary = _vocabularies.id_vocabulary(self.candidate_vocabulary, self.candidate_id_key)
        if vocabulary is not None:
            positions = vocabulary.lookup(ids, argument.replace("`", ""))
            _vocabularies.require_known(vocabulary, positions, ids, argument)
        else:
            positions = _input_checks.check_ids(
                self, {self.candidate_id_key: ids}, CANDIDATE, argument
            )[self.candidate_id_key]
        rows = {
            name: ops.convert_to_numpy(ops.take(variable.value, positions, axis=0))
            for name, variable in self._catalogue_features.items()
        }
        return rows, ids

    def _candidate_inputs(
        self, features: Any, ids: Any, argument: str, own_tower: bool = True, hint: str = ""
    ) -> tuple[Any, Any]:
        """Candidates given to `index_candidates` / `similar_items` as tower inputs,
        with their ids (the raw ids by default, with a candidate vocabulary).

        Ids alone, for a tower over catalogue features, take their catalogue rows;
        NumPy-like raw features are looked up; datasets and generators pass as
        they are. `own_tower` is False for another tower (`item_tower`), whose
        inputs the structure check does not know.
        """
        if own_tower and self._takes_catalogue_rows(features):
            rows, raw_ids = self._catalogue_rows(features, argument)
            return rows, raw_ids if ids is None else ids
        if _serving._is_batches(features):
            return features, ids
        encoded = self._encode(CANDIDATE, features, argument)
        if own_tower:
            self._check_structure(encoded, CANDIDATE, argument, hint)
        if isinstance(self.candidate_vocabulary, Vocabulary):
            _vocabularies.require_known(self.candidate_vocabulary, encoded, features, argument)
            return encoded, features if ids is None else ids
        vocabulary = _vocabularies.id_vocabulary(self.candidate_vocabulary, self.candidate_id_key)
        if vocabulary is not None and ids is None:
            ids = features[self.candidate_id_key]
        return encoded, ids

    def _takes_catalogue_rows(self, features: Any) -> bool:
        """Ids (not a dict) for a candidate tower over the dict features of a catalogue."""
        return (
            bool(self._catalogue_features)
            and self.candidate_id_key in self._catalogue_features
            and not isinstance(features, Mapping)
            and not _serving._is_batches(features)
        )

    def _check_structure(self, features: Any, side: str, argument: str, hint: str = "") -> None:
        """Host-side: a dict where the built tower took an array, or the reverse.

        Otherwise each backend fails in its own words inside the compiled call.
        """
        spec = self._query_input_spec if side == QUERY else self._candidate_input_spec
        if spec is None or _serving._is_batches(features):
            return
        if isinstance(spec, Mapping) and not isinstance(features, Mapping):
            received = np.asarray(features) if isinstance(features, (list, tuple)) else features
            kind = getattr(received, "dtype", type(received).__name__)
            raise ValueError(
                f"{argument} must be a dict of features {sorted(spec)}, as the {side} tower "
                f"takes. Received an array of {kind}.{hint}"
            )
        if not isinstance(spec, Mapping) and isinstance(features, Mapping):
            raise ValueError(
                f"{argument} must be one array, as the {side} tower takes. Received a dict "
                f"of features {sorted(map(str, features))}."
            )

    def embed_queries(self, query_features: Any, training: bool = False) -> Tensor:
        """Runs the query tower; records the input spec used to rebuild on load."""
        query_features = _input_checks.check_ids(self, query_features, QUERY, "query_features")
        embeddings = self.query_tower(query_features, training=training)
        if self._query_input_spec is None:  # once the tower took them
            self._query_input_spec = _input_spec(query_features)
        return embeddings

    def embed_candidates(self, candidate_features: Any, training: bool = False) -> Tensor:
        """Runs the candidate tower; records the input spec used to rebuild on load."""
        candidate_features = _input_checks.check_ids(
            self, candidate_features, CANDIDATE, "candidate_features"
        )
        embeddings = self.candidate_tower(candidate_features, training=training)
        if self._candidate_input_spec is None:  # once the tower took them
            self._candidate_input_spec = _input_spec(candidate_features)
        return embeddings

    def call(self, inputs: Any, training: bool = False) -> Any:
        if not _is_pair(inputs):
            return self.embed_queries(inputs, training=training)
        query_embeddings = self.embed_queries(inputs[QUERY], training=training)
        candidate_embeddings = self.embed_candidates(inputs[CANDIDATE], training=training)
        query_shape = tuple(query_embeddings.shape)
        candidate_shape = tuple(candidate_embeddings.shape)
        if len(query_shape) != 2 or len(candidate_shape) != 2:
            raise ValueError(
                "Both towers must return [batch, dim] embeddings. Received query "
                f"embeddings of shape {query_shape} and candidate embeddings of "
                f"shape {candidate_shape}."
            )
        if query_shape[-1] != candidate_shape[-1]:
            raise ValueError(
                f"The query tower's output dim (={query_shape[-1]}) must equal the "
                f"candidate tower's output dim (={candidate_shape[-1]})."
            )
        if self._predicting:  # predict on pairs: the two embeddings, nothing per batch
            return {
                "query_embeddings": query_embeddings,
                "candidate_embeddings": candidate_embeddings,
            }
        return self.retrieval_outputs(inputs, query_embeddings, candidate_embeddings, training)

    def retrieval_outputs(
        self,
        inputs: Mapping[str, Any],
        query_embeddings: Tensor,
        candidate_embeddings: Tensor,
        training: bool = False,
    ) -> RetrievalOutputs:
        """The two embeddings, plus what the loss and metrics need beyond them.

        `call` returns this for pair inputs. A subclass that overrides `call`
        returns it too (or the loss raises, naming what is missing): candidate
        ids, the catalogue's embeddings, sampled negatives, as the configuration
        needs (see `two_tower.models.retrieval_outputs.RetrievalOutputs`). They
        are made here, not in the loss or the metrics, so that every backend's
        step tracks the sampler's seed and the tower's variables.

        Args:
            inputs: the pair inputs `{"query": ..., "candidate": ...}`.
            query_embeddings: `[batch, dim]` query tower output.
            candidate_embeddings: `[batch, dim]` candidate tower output.
            training: whether this is a training step.

        Returns:
            A `RetrievalOutputs` dict.
        """
        outputs: RetrievalOutputs = {
            "query_embeddings": query_embeddings,
            "candidate_embeddings": candidate_embeddings,
        }
        needed = self.task.required_outputs(
            training=training, ranks_catalogue=bool(self.retrieval_metrics)
        )
        if "candidate_ids" in needed:
            outputs["candidate_ids"] = self.task.candidate_ids_of(inputs[CANDIDATE])
        catalogue = None
        if "catalogue_embeddings" in needed or "sampled_candidate_ids" in needed:
            catalogue = self._catalogue_inputs(inputs[CANDIDATE])
        if "sampled_candidate_ids" in needed:
            ids, embeddings = self.task.sample_negatives(
                self.candidate_tower, catalogue, self._negative_seed, training
            )
            outputs["sampled_candidate_ids"] = ids
            outputs["sampled_candidate_embeddings"] = embeddings
        if "catalogue_embeddings" in needed:
            outputs["catalogue_embeddings"] = self.candidate_tower(catalogue, training=training)
        if "metrics_catalogue_embeddings" in needed:
            # Marks an evaluation step: FactorizedTopK metrics update only then.
            outputs["metrics_catalogue_embeddings"] = outputs["catalogue_embeddings"]
        if SAMPLING_PROBABILITY in inputs:
            outputs["candidate_sampling_probability"] = inputs[SAMPLING_PROBABILITY]
        return outputs

    def _catalogue_inputs(self, candidate_features: Any) -> Any:
        """The whole catalogue's candidate-tower inputs, row i for candidate id i."""
        if self._catalogue_features:
            return {name: variable.value for name, variable in self._catalogue_features.items()}
        if isinstance(candidate_features, Mapping):
            raise ValueError(
                f"loss={self.loss_name!r} and FactorizedTopK metrics embed the whole "
                "catalogue with the candidate tower, which takes dict features "
                f"{sorted(candidate_features)}. Call `set_catalogue(features)` first, "
                "with row i holding the features of candidate id i."
            )
        assert self.catalogue_size is not None
        return ops.arange(self.catalogue_size, dtype="int32")

    def set_catalogue(self, features: Mapping[str, Any]) -> None:
        """Stores the catalogue's candidate features for the catalogue losses and metrics.

        `"full_softmax"`, `"sampled_softmax"` and `FactorizedTopK` metrics embed
        every candidate id in `[0, catalogue_size)`. A candidate tower over ids
        gets `arange(catalogue_size)`; a tower over a dict of features gets these
        features instead: row i of each array describes candidate id i (the
        value of the `candidate_id_key` feature). They are kept as non-trainable
        variables, so they are saved with the model and live on the device.

        Calling it again replaces the values; the shapes and dtypes must stay
        the same (pad multi-valued features to the same width).

        With a `candidate_vocabulary` the features are raw values, looked up
        first. When it maps the `candidate_id_key` feature, the rows may come in
        any order and need not cover every index: each row goes to its id's
        index, and the rest (the OOV buckets, known ids without a row) get 0,
        or -1 (empty) in multi-valued features.

        Args:
            features: feature name -> NumPy array of integers (indices, e.g.
                from `two_tower.Vocabulary`) or floats, `catalogue_size` rows;
                or raw values for the features `candidate_vocabulary` maps.

        Raises:
            ValueError: without `catalogue_size`; features that are not a dict of
                numeric arrays with `catalogue_size` rows; a `candidate_id_key`
                feature other than `arange(catalogue_size)`; indices outside a
                `FeatureTower`'s vocabularies; or shapes or dtypes that differ
                from the catalogue set before.

        Examples:
            >>> import keras, numpy as np
            >>> tower = two_tower.FeatureTower(
            ...     categorical={"movie": 5, "decade": 3}, output_dim=4)
            >>> model = two_tower.TwoTowerRetrieval(
            ...     keras.layers.Embedding(10, 4), tower, loss="full_softmax",
            ...     catalogue_size=5, candidate_id_key="movie")
            >>> model.set_catalogue({"movie": np.arange(5), "decade": np.array([0, 1, 1, 2, 0])})
            >>> model.compile(optimizer="adam")
            >>> x = {"query": np.array([1, 2]),
            ...      "candidate": {"movie": np.array([3, 4]), "decade": np.array([2, 0])}}
            >>> history = model.fit(x, epochs=1, verbose=0)
        """
        if self.catalogue_size is None:
            raise ValueError(
                "set_catalogue needs the model's `catalogue_size` (the number of "
                "candidate ids). Received catalogue_size=None"
            )
        features = _vocabularies.catalogue_rows(
            self.candidate_vocabulary, features, self.candidate_id_key, self.catalogue_size
        )
        arrays = _input_checks.catalogue_features(self, features)
        current = self._catalogue_features
        if current:
            expected = {n: (tuple(v.shape), v.dtype) for n, v in current.items()}
            received = {n: (a.shape, str(a.dtype)) for n, a in arrays.items()}
            if expected != received:
                raise ValueError(
                    "set_catalogue can only replace the values of the catalogue it "
                    f"holds: expected (shape, dtype) {expected}, received {received}"
                )
            for name, array in arrays.items():
                current[name].assign(array)
            return
        self._add_catalogue_variables({n: (str(a.dtype), a.shape) for n, a in arrays.items()})
        for name, array in arrays.items():
            self._catalogue_features[name].assign(array)

    def _add_catalogue_variables(self, specs: Mapping[str, tuple[str, Sequence[int]]]) -> None:
        self._catalogue_features = {
            name: self.add_weight(
                shape=tuple(shape),
                dtype=dtype,
                initializer=keras.initializers.Constant(0),
                trainable=False,
                name=f"catalogue_{name}",
            )
            for name, (dtype, shape) in specs.items()
        }
        # Compiled steps traced before now do not read the new variables.
        self.train_function = self.test_function = self.predict_function = None

    # ---------------------------------------------------------------- scoring
    def compute_similarities(
        self, query_embeddings: Tensor, candidate_embeddings: Tensor
    ) -> Tensor:
        """`[queries, candidates]` scores; the dot product by default."""
        return ops.matmul(query_embeddings, ops.transpose(candidate_embeddings))

    def compute_scores(self, query_embeddings: Tensor, candidate_embeddings: Tensor) -> Tensor:
        """`[batch]` scores of aligned (query, candidate) pairs; the dot product."""
        return ops.sum(query_embeddings * candidate_embeddings, axis=-1)

    # ------------------------------------------------------------------- loss
    def compute_retrieval_loss(
        self,
        labels: Tensor | None,
        outputs: Mapping[str, Tensor],
        sample_weight: Tensor | None,
    ) -> Tensor:
        """The retrieval loss of one batch, from what `call` returned for pairs.

        The model's `RetrievalTask` computes it, scoring with `compute_similarities`
        (the softmax losses) or `compute_scores` (`"mse"`).
        """
        return self.task.compute_loss(
            labels,
            outputs,  # type: ignore[arg-type]
            sample_weight,
            similarity_fn=self.compute_similarities,
            score_fn=self.compute_scores,
        )

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: Any = None,
        sample_weight: Any = None,
        training: bool = True,
    ) -> Tensor:
        if not isinstance(y_pred, Mapping) or "query_embeddings" not in y_pred:
            raise ValueError(
                "fit/evaluate need pair inputs: x = {'query': query_features, "
                "'candidate': candidate_features}. "
                f"Received x of type {type(x).__name__}"
                + (f" with keys {sorted(x.keys())}" if isinstance(x, Mapping) else "")
            )
        needed = self.task.required_outputs(
            training=training, ranks_catalogue=bool(self.retrieval_metrics)
        )
        missing = sorted(needed - set(y_pred))
        if missing:
            raise ValueError(
                f"`call` returned no {missing}, which loss={self.loss_name!r} "
                f"(remove_accidental_hits={self.remove_accidental_hits}"
                + (", FactorizedTopK metrics" if self.retrieval_metrics else "")
                + ") needs. A `call` override must return "
                "`self.retrieval_outputs(inputs, query_embeddings, candidate_embeddings, "
                f"training)`. Received outputs {sorted(y_pred)}"
            )
        loss = self.compute_retrieval_loss(y, y_pred, sample_weight)
        for extra_loss in self.losses:
            loss = loss + ops.cast(extra_loss, loss.dtype)
        rows = ops.shape(y_pred["query_embeddings"])[0]
        return backend_module().replica_loss(loss, rows)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("loss") is not None or (len(args) > 1 and args[1] is not None):
            raise ValueError(
                f"Pass the loss to TwoTowerRetrieval(loss=...) (one of {LOSSES}), "
                "not to compile(); the retrieval loss needs both towers' embeddings."
            )
        metrics = kwargs.pop("metrics", None)
        if len(args) > 2:
            raise TypeError("Pass compile arguments after `optimizer` by keyword.")
        if isinstance(metrics, FactorizedTopK):
            metrics = [metrics]
        retrieval_metrics = [m for m in metrics or [] if isinstance(m, FactorizedTopK)]
        other_metrics = [m for m in metrics or [] if not isinstance(m, FactorizedTopK)]
        if other_metrics or kwargs.get("weighted_metrics"):
            raise ValueError(
                "TwoTowerRetrieval takes two_tower.FactorizedTopK metrics only: Keras "
                "metrics compare `y` with one prediction, and this model predicts "
                f"embeddings. Received metrics={metrics!r}"
            )
        if retrieval_metrics and self.catalogue_size is None:
            raise ValueError(
                "FactorizedTopK metrics rank each positive against the whole "
                "catalogue, so the model needs `catalogue_size`. Received "
                "catalogue_size=None"
            )
        names = [m.name for m in retrieval_metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"FactorizedTopK metrics need distinct names. Received: {names}")
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
        backend_module().check_replicas()
        args, kwargs = _input_checks.fit_arguments(what, args, kwargs)
        if not kwargs.get("_use_cached_eval_dataset"):
            # (Keras' fit evaluates its validation data, already encoded, that way.)
            args, kwargs = _input_checks.replace_x(args, kwargs, self._encoded_pairs)
        if what == "fit":
            args, kwargs = _input_checks.replace_validation_x(args, kwargs, self._encoded_pairs)
        _input_checks.check_fit_arguments(self, what, args, kwargs)
        self._build_towers(args[0] if args else kwargs.get("x"))
        args, kwargs = _input_checks.for_backend(what, args, kwargs, backend_module())
        train_function = None
        if what == "fit":
            args, kwargs, train_function = _array_training.prepare(
                self, args, kwargs, backend_module()
            )
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
            _input_checks.check_ids(self, x[QUERY], QUERY, "x['query']")
            _input_checks.check_ids(self, x[CANDIDATE], CANDIDATE, "x['candidate']")
            self._build_towers(x)
        else:
            if not _serving._is_batches(x):
                x = _input_checks.lists_as_arrays(self._encode(QUERY, x, "x"), "x")
                self._check_structure(x, QUERY, "x")
            _input_checks.check_ids(self, x, QUERY, "x")
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
        if strategy is not None and self.query_tower.built and self.candidate_tower.built:
            # Keras' TensorFlow trainer otherwise builds the model from the
            # replicas' MEAN batch, where the ids are floats.
            self.built = True

    def compile_from_config(self, config: dict[str, Any]) -> None:
        # Keras' default skips compiling on load when `compile` is overridden; ours
        # only adds a check, so compile as the default would.
        from two_tower.saving import _loadable_compile_config

        self.compile(**_loadable_compile_config(config))
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

    # -------------------------------------------------------------- retrieval
    def index_candidates(
        self, candidates: Any = None, candidate_ids: Any = None, batch_size: int = 4096
    ) -> None:
        """Embeds the catalogue with the candidate tower and indexes it.

        The embeddings go into the index batch by batch: the index's copy is
        the only one (see `BruteForceIndex.index`).

        With a `candidate_vocabulary`, `candidates` are raw values, and the ids
        default to the raw ids; without `candidates`, every known candidate is
        indexed (not the OOV rows), under its raw id.

        Args:
            candidates: candidate features (an array or a dict of arrays), one
                row per candidate, or a dataset or generator of such batches
                (of tower inputs); or, for a tower over the dict features given
                to `set_catalogue`, candidate ids, which index their catalogue
                rows. Defaults to the features given to `set_catalogue`, or with
                a candidate vocabulary of ids, to every id it knows.
            candidate_ids: one unique id per candidate, integers (the whole
                int64 range) or strings; defaults to the raw ids with a
                candidate vocabulary, else to row positions.
            batch_size: rows embedded at once.

        Raises:
            ValueError: without `candidates` when no catalogue was set (and no
                candidate vocabulary of ids), on malformed candidates or raw
                ids the candidate vocabulary does not know (see "Raw ids"), on
                ids that are not all integers or all strings, or duplicated, or
                on a bad `batch_size`.
        """
        if candidates is None:
            vocabulary = _vocabularies.id_vocabulary(
                self.candidate_vocabulary, self.candidate_id_key
            )
            if not self._catalogue_features and not isinstance(
                self.candidate_vocabulary, Vocabulary
            ):
                raise ValueError(
                    "index_candidates needs `candidates` (the features of every "
                    "candidate), or a catalogue given earlier with `set_catalogue`."
                )
            known = slice(None)
            if vocabulary is not None:  # every known id, under its raw id
                assert vocabulary.vocabulary is not None
                known = slice(vocabulary.num_oov_buckets, vocabulary.size)
                if candidate_ids is None:
                    candidate_ids = vocabulary.vocabulary
            if self._catalogue_features:
                candidates = {
                    name: ops.convert_to_numpy(variable.value)[known]
                    for name, variable in self._catalogue_features.items()
                }
            else:
                candidates = np.arange(known.start, known.stop, dtype="int32")
        else:
            candidates, candidate_ids = self._candidate_inputs(
                candidates,
                candidate_ids,
                "`candidates`",
                hint=" To index candidates by id, give their features to `set_catalogue` first.",
            )
        with backend_module().serving_slot():  # embedded block by block into the index
            blocks = _serving.embed_candidates(self, candidates, batch_size)
            self.candidate_index.index(blocks, candidate_ids)

    def recommend(
        self,
        queries: Any,
        k: int = 10,
        *,
        exclude: Sequence[Any] | None = None,
        ignore_unknown_exclusions: bool = False,
        return_scores: bool = False,
        batch_size: int = 1024,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Top-k candidate ids for each query, best first.

        Safe to call from many threads at once on every backend, with the same
        results as serial calls (the towers and the search run compiled, reading
        the variables without Keras' stateful `predict`; see `docs/serving.md`).
        Query ids for an id tower are checked first: strings, non-integer floats
        and out-of-range ids raise; integer-valued floats are used as integers.
        With a `query_vocabulary`, `queries` are raw values (an unknown one goes
        to its OOV bucket), and the ids returned and excluded are the ids the
        catalogue was indexed with (raw ids, with a candidate vocabulary).

        Args:
            queries: query features (an array or a dict of arrays), or a
                dataset or generator of such batches (e.g. a `tf.data.Dataset`)
                of query tower inputs.
            k: results per query; `1 <= k <= ` the number of indexed candidates.
            exclude: one sequence of candidate ids (or None) per query to leave
                out, e.g. what each user already watched: `[[3, 5], None]`. A
                flat list of ids raises (wrap it per query). The results are the
                exact top k among the remaining candidates.
            ignore_unknown_exclusions: skip excluded ids that are not indexed
                instead of raising.
            return_scores: also return the `[queries, k]` scores.
            batch_size: queries embedded at once.

        Returns:
            `[queries, k]` ids (NumPy, dtype of the indexed ids), or `(ids,
            scores)` when `return_scores` is true.

        Raises:
            ValueError: if nothing is indexed, `queries` is empty or holds bad
                ids, `k` or `batch_size` is out of range, a flag is not a bool,
                or `exclude` is malformed, names unknown ids, or leaves fewer
                than `k` candidates (see `BruteForceIndex.search`).
        """
        _serving.require_index(self)
        _serving.check_flags(
            return_scores=return_scores, ignore_unknown_exclusions=ignore_unknown_exclusions
        )
        if not _serving._is_batches(queries):
            queries = self._encode(QUERY, queries, "`queries`")
            self._check_structure(queries, QUERY, "`queries`")
        with backend_module().serving_slot():
            query_embeddings = _serving.embed_queries(self, queries, batch_size)
            scores, ids = self.candidate_index.search(
                query_embeddings,
                k=k,
                similarity_fn=self.compute_similarities,
                exclude=exclude,
                ignore_unknown_exclusions=ignore_unknown_exclusions,
            )
        return (ids, scores) if return_scores else ids

    def similar_items(
        self,
        items: Any,
        k: int = 10,
        *,
        item_ids: Any = None,
        exclude_self: bool = True,
        item_tower: keras.layers.Layer | None = None,
        exclude: Sequence[Any] | None = None,
        ignore_unknown_exclusions: bool = False,
        return_scores: bool = False,
        batch_size: int = 4096,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Item-to-item: the indexed candidates closest to each given item.

        Each item is embedded with the candidate tower (or `item_tower`, for a
        second tower trained for item queries) and scored against the index with
        `compute_similarities`. With a `candidate_vocabulary`, `items` are raw
        values and `item_ids` default to their raw ids; an unknown raw id raises
        when the candidate tower takes ids alone (see "Raw ids").

        Args:
            items: item features (an array or a dict of arrays), one row per
                item; or, for a tower over the dict features given to
                `set_catalogue`, the items' ids (raw ids with a vocabulary of
                the `candidate_id_key`), which take their catalogue rows.
            k: results per item.
            item_ids: the items' ids in the index, used to leave each item out of
                its own results. Defaults to `items` when it is a 1D array of ids;
                ids that are not indexed are simply not excluded.
            exclude_self: leave each item out of its own results.
            item_tower: embeds `items` instead of the candidate tower; its output
                dim must match the index.
            exclude: further ids to leave out, one sequence (or None) per item
                (a flat list of ids raises).
            ignore_unknown_exclusions: skip unknown ids in `exclude` instead of
                raising.
            return_scores: also return the `[items, k]` scores.
            batch_size: items embedded at once.

        Returns:
            `[items, k]` ids, or `(ids, scores)` when `return_scores` is true.

        Raises:
            ValueError: if nothing is indexed; `items` is not one row per item;
                `exclude_self` is set but the ids of dict-featured items are not
                given; `item_ids` is not one id per item; or the other arguments
                are out of range (see `recommend`).

        Examples:
            >>> import numpy as np
            >>> model = two_tower.TwoTowerRetrieval.from_ids(5, 8)
            >>> model.index_candidates(np.arange(8))
            >>> model.similar_items(np.array([3]), k=2).shape
            (1, 2)
        """
        _serving.check_flags(
            return_scores=return_scores,
            exclude_self=exclude_self,
            ignore_unknown_exclusions=ignore_unknown_exclusions,
        )
        items, item_ids = self._candidate_inputs(
            items, item_ids, "`items`", own_tower=item_tower is None
        )
        with backend_module().serving_slot():
            scores, found = _serving.similar_items(
                self,
                items,
                k,
                item_ids=item_ids,
                exclude_self=exclude_self,
                item_tower=item_tower,
                exclude=exclude,
                ignore_unknown_exclusions=ignore_unknown_exclusions,
                batch_size=batch_size,
            )
        return (found, scores) if return_scores else found

    # ---------------------------------------------------------- serialization
    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "query_tower": keras.saving.serialize_keras_object(self.query_tower),
                "candidate_tower": keras.saving.serialize_keras_object(self.candidate_tower),
                **self.task.get_config(),
                "candidate_id_key": self.candidate_id_key,
                "query_id_key": self.query_id_key,
                "candidate_index": keras.saving.serialize_keras_object(self.candidate_index),
                "query_vocabulary": _vocabularies.serialize(self.query_vocabulary),
                "candidate_vocabulary": _vocabularies.serialize(self.candidate_vocabulary),
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TwoTowerRetrieval:
        config = dict(config)
        for key in ("query_tower", "candidate_tower", "candidate_index"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        for key in ("query_vocabulary", "candidate_vocabulary"):
            config[key] = _vocabularies.deserialize(config.get(key))
        return cls(**config)

    def get_build_config(self) -> dict[str, Any]:
        # Always a config, so that loading calls `build_from_config` and hence
        # `build`, where subclasses create their own weights.
        return {
            "query_input_spec": self._query_input_spec,
            "candidate_input_spec": self._candidate_input_spec,
            "catalogue_spec": {
                name: [variable.dtype, list(variable.shape)]
                for name, variable in self._catalogue_features.items()
            },
        }

    def build_from_config(self, config: dict[str, Any]) -> None:
        query_spec = config.get("query_input_spec")
        candidate_spec = config.get("candidate_input_spec")
        if query_spec is not None:
            self.embed_queries(_symbolic_inputs(query_spec))
        if candidate_spec is not None:
            self.embed_candidates(_symbolic_inputs(candidate_spec))
        catalogue_spec = config.get("catalogue_spec") or {}
        if catalogue_spec:  # the values come with the saved weights
            self._add_catalogue_variables(catalogue_spec)
        self.build()  # a subclass's own weights (e.g. a learned temperature)
