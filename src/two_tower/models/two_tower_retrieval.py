"""The two-tower retrieval model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import keras
from keras import ops

from two_tower import defaults
from two_tower.backends import backend_module
from two_tower.metrics.factorized_top_k import FactorizedTopK
from two_tower.models import _defaults, _growth, _input_checks, _serving, _vocabularies
from two_tower.models._catalogue import Catalogue
from two_tower.models._serving_methods import Serving
from two_tower.models._training import Training
from two_tower.models.retrieval_outputs import (
    CANDIDATE,
    QUERY,
    SAMPLING_PROBABILITY,
    RetrievalOutputs,
)
from two_tower.models.retrieval_outputs import is_pair as _is_pair
from two_tower.models.retrieval_task import RetrievalTask, position_count
from two_tower.negatives.frequency_estimator import FrequencyEstimator
from two_tower.negatives.negative_cache import NegativeCache
from two_tower.negatives.popularity_sampler import PopularitySampler
from two_tower.preprocessing.vocabulary import Vocabulary
from two_tower.retrieval.brute_force_index import BruteForceIndex
from two_tower.retrieval.candidate_index import CandidateIndex
from two_tower.types import Tensor

NEGATIVE_LAYERS = ("frequency_estimator", "negative_cache", "negative_sampler")
"""The constructor's layers that make a softmax's negatives and their logQ."""


@keras.saving.register_keras_serializable(package="two_tower")
class TwoTowerRetrieval(Training, Serving, keras.Model):
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
    - `call(inputs, training)`: with pair inputs it returns
      `self.retrieval_outputs(inputs, query_embeddings, candidate_embeddings,
      training)` (the loss raises, naming anything a configuration needs that is
      missing); with query inputs, the `[batch, dim]` query embeddings.

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
        candidate_index: the top-k index, any `two_tower.retrieval.CandidateIndex`
            (`BruteForceIndex`, exact, by default, scoring in float32 under any
            mixed-precision policy; or a `FaissIndex`).
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
        frequency_estimator: a `two_tower.negatives.FrequencyEstimator`: the
            logQ correction of `"softmax"` and `"sampled_softmax"` from each
            candidate's expected occurrences per batch, estimated in the train
            step (instead of `x["candidate_sampling_probability"]`, which it
            refuses beside it).
        negative_cache: a `two_tower.negatives.NegativeCache`: the candidates
            of the last training batches as extra negatives (`"softmax"` and
            `"sampled_softmax"`; training steps only).
        negative_sampler: a `two_tower.negatives.PopularitySampler` over the
            `catalogue_size` ids: `"sampled_softmax"` draws its negatives from
            it instead of uniformly.
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
        candidate_index: CandidateIndex | None = None,
        query_id_key: str | None = None,
        cross_replica_negatives: bool = True,
        query_vocabulary: Vocabulary | Mapping[str, Vocabulary] | None = None,
        candidate_vocabulary: Vocabulary | Mapping[str, Vocabulary] | None = None,
        frequency_estimator: FrequencyEstimator | None = None,
        negative_cache: NegativeCache | None = None,
        negative_sampler: PopularitySampler | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, layer, kind in (
            ("frequency_estimator", frequency_estimator, FrequencyEstimator),
            ("negative_cache", negative_cache, NegativeCache),
            ("negative_sampler", negative_sampler, PopularitySampler),
        ):
            if layer is not None and not isinstance(layer, kind):
                raise TypeError(
                    f"`{name}` must be a two_tower.negatives.{kind.__name__} or None. "
                    f"Received: {layer!r} of type {type(layer).__name__}"
                )
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
            estimates_frequency=frequency_estimator is not None,
            caches_negatives=negative_cache is not None,
            sampler_items=None if negative_sampler is None else negative_sampler.num_items,
        )
        self.query_vocabulary, self.candidate_vocabulary = _vocabularies.check_both(
            query_vocabulary,
            candidate_vocabulary,
            _input_checks.tower_id_limit(query_tower, QUERY),
            _input_checks.tower_id_limit(candidate_tower, CANDIDATE),
            candidate_id_key,
            catalogue_size,
        )
        self.query_tower = query_tower
        self.candidate_tower = candidate_tower
        self.frequency_estimator = frequency_estimator
        self.negative_cache = negative_cache
        self.negative_sampler = negative_sampler
        share = getattr(query_tower, "share_candidate_items", None)
        if callable(share):  # a HistoryTower embeds its history with the candidates' table
            share(candidate_tower, candidate_id_key)
        self.candidate_id_key = candidate_id_key
        self.query_id_key = query_id_key
        self._predicting = False  # set by predict: pair inputs return the embeddings only
        self._catalogue = Catalogue(
            self.add_weight, self.catalogue_size, candidate_id_key, candidate_tower
        )
        self._negative_seed = keras.random.SeedGenerator(seed=0, name="negative_sampler")
        self.retrieval_metrics: list[FactorizedTopK] = []
        # float32 under a mixed-precision policy too: bfloat16 scores would reorder
        # near-ties. `BruteForceIndex(dtype="float16")` halves its memory by choice.
        self.candidate_index = candidate_index or BruteForceIndex(
            name="candidate_index", dtype="float32"
        )
        self._query_input_spec: Any = None
        self._candidate_input_spec: Any = None
        # Serving's compiled tower functions (see `_serving`); not tracked by Keras.
        object.__setattr__(self, "_serving_functions", _serving.function_cache())

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
        return cls(
            **_defaults.id_model_arguments(
                num_queries,
                num_candidates,
                embedding_dim=embedding_dim,
                l2=l2,
                temperature=temperature,
                sparse=sparse,
                query_vocabulary=query_vocabulary,
                candidate_vocabulary=candidate_vocabulary,
                **kwargs,
            )
        )

    @classmethod
    def for_sequences(cls, num_items: int, **options: Any) -> TwoTowerRetrieval:
        """The tuned next-item model: a `SequenceTower` over a shared item table.

        Builds `SequenceTower` (sharing the candidate tower's table) and
        `IdEmbeddingTower(num_items)` with the model options of
        `two_tower.defaults.SEQUENCE`, each replaceable by keyword. Train it
        per position on a `two_tower.datasets.SequenceDataset` with
        `compile(optimizer=two_tower.defaults.sequence_optimizer())` and
        `two_tower.evaluation.RetrievalValidation` (see `docs/sequential.md`).

        Args:
            num_items: item indices run from 0 to `num_items - 1`.
            **options: the model keys of `defaults.SEQUENCE` (`max_length`,
                `embedding_dim`, `num_blocks`, `num_heads`, `dropout`,
                `positions`, `item_bias`, `loss`, `temperature`,
                `num_sampled_negatives`); the training keys (`batch_size`,
                `sampling_probability`, `epochs`, `learning_rate`: pass them
                to `SequenceDataset`, `fit` and `sequence_optimizer`) are
                accepted and ignored, so the whole dict can be passed;
                anything else goes to `TwoTowerRetrieval` (e.g. `name`).

        Returns:
            An uncompiled `TwoTowerRetrieval`.

        Raises:
            TypeError: `query_tower`, `candidate_tower` or `catalogue_size`
                given (it builds them).
            ValueError: the towers' and the model's own errors.

        Examples:
            >>> model = two_tower.TwoTowerRetrieval.for_sequences(100, max_length=8)
            >>> model.query_tower.item_table is model.candidate_tower.embedding
            True
        """
        training = {key: options.pop(key) for key in defaults.SEQUENCE_TRAINING if key in options}
        del training
        return cls(**_defaults.sequence_model_arguments(num_items, **options))

    # ----------------------------------------------------------------- towers
    def grow_tables(self, query: Any = None, candidate: Any = None) -> None:
        """Grows the towers' tables to take new ids; training goes on where it was.

        After new users or items appear (e.g. `Vocabulary.add`), the tables
        get rows for them: old rows keep their values, new rows get the
        table's initializer (a learned bias starts at zero). The optimizer's
        state grows with them: old rows keep theirs (Adam's moments,
        Adagrad's accumulators), new rows start as a fresh optimizer's would,
        and the step count carries on. Old ids score exactly as before, so a
        served catalogue stays valid; add the new candidates to the index with
        `candidate_index.add` (or `index_candidates`) to serve them.

        Sizes: with no argument, each side grows to its vocabularies' sizes
        (the model's `query_vocabulary` / `candidate_vocabulary`: one
        vocabulary for a tower over ids, or one per feature table of a
        `FeatureTower`). Or pass the new number of ids: an int for a tower
        over one id array (`IdEmbeddingTower`, `SparseEmbedding`, Keras'
        `Embedding`, or a `Sequential` starting with one, a history tower's
        own table), a dict of feature name -> size for a `FeatureTower`.
        Under a model-parallel distribution the rows are padded to the model
        axis again. `catalogue_size`, when it equalled the candidate tower's
        ids, grows with them.

        Cost: O(rows) once, a copy of each grown table, and of the optimizer's
        state (the whole optimizer is rebuilt, so every slot is copied once);
        training steps cost what they did. A table built with `table_rows`
        above its ids has room: growing within it keeps the table's variable
        (its new rows are drawn in place).
        Sparse (`sparse=True`) and dense tables grow alike, on every backend.

        Args:
            query: the query side's new sizes, or None.
            candidate: the candidate side's new sizes, or None.

        Raises:
            ValueError: a size below the current one; sizes for a tower that
                cannot grow, of the wrong shape, or for unknown features; a
                candidate side with catalogue features set
                (`set_catalogue`): they would need rows for the new
                candidates. Nothing changes then.

        Examples:
            >>> import numpy as np
            >>> items = two_tower.Vocabulary(["a", "b", "c"])
            >>> model = two_tower.TwoTowerRetrieval(
            ...     two_tower.IdEmbeddingTower(5, 8), two_tower.IdEmbeddingTower(items.size, 8),
            ...     candidate_vocabulary=items)
            >>> model.compile(optimizer="adam")
            >>> x = {"query": np.array([0, 1, 2]), "candidate": np.array(["a", "b", "c"])}
            >>> _ = model.fit(x, epochs=1, verbose=0)
            >>> new = items.add(["d", "e"])
            >>> model.grow_tables()
            >>> model.candidate_tower.vocabulary_size
            6
            >>> x = {"query": np.array([3, 4]), "candidate": np.array(["d", "e"])}
            >>> _ = model.fit(x, epochs=1, verbose=0)
        """
        plans = {
            side: _growth.plan(side, tower, vocabularies, sizes)
            for side, tower, vocabularies, sizes in (
                (QUERY, self.query_tower, self.query_vocabulary, query),
                (CANDIDATE, self.candidate_tower, self.candidate_vocabulary, candidate),
            )
        }
        growing = {side: plan for side, plan in plans.items() if plan is not None and plan.grows()}
        if not growing:
            return
        candidate_plan = growing.get(CANDIDATE)
        catalogue_size = self.catalogue_size
        if candidate_plan is not None and catalogue_size is not None:
            if self._catalogue:
                raise ValueError(
                    "This model's catalogue features are set (`set_catalogue`), one row per "
                    "candidate id: growing the candidate tables would leave the new "
                    "candidates without rows. Rebuild the model with the larger "
                    "catalogue_size and load its weights, or leave the candidate side as it is."
                )
            before, after = candidate_plan.before, candidate_plan.after
            if isinstance(before, int) and isinstance(after, int) and catalogue_size == before:
                catalogue_size = after
        previous: Any = getattr(self, "optimizer", None)
        variables = list(self.trainable_variables)
        strategy = getattr(self, "_distribute_strategy", None)  # set under tf.distribute
        # In the strategy's scope: the optimizer's variables too are the strategy's.
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            fresh = _growth.fresh_optimizer(previous, variables)  # before any change: may raise
            for plan in growing.values():
                plan.tower.grow(plan.after)
            backend_module().variables_replaced(self)
            if fresh is not None:
                fresh = _growth.carried_over(previous, fresh, variables, self.trainable_variables)
                compiled = getattr(self, "_compile_config", None)
                if compiled is not None and compiled.config.get("optimizer") is previous:
                    compiled.config["optimizer"] = fresh  # saved with the model
                self.optimizer = fresh
        self.task.catalogue_size = catalogue_size
        self._catalogue.catalogue_size = catalogue_size
        # Compiled steps and serving functions read the old variables and sizes.
        self.train_function = self.test_function = self.predict_function = None
        self._array_trainer = None
        object.__setattr__(self, "_serving_functions", _serving.function_cache())

    def _tower_side(self, side: str) -> _input_checks.TowerSide:
        """What the id checks need of one side (they take this, not the model)."""
        if side == QUERY:
            return _input_checks.TowerSide(QUERY, self.query_tower, self.query_id_key)
        return _input_checks.TowerSide(
            CANDIDATE, self.candidate_tower, self.candidate_id_key, self.catalogue_size
        )

    def embed_queries(self, query_features: Any, training: bool = False) -> Tensor:
        """Runs the query tower; records the input spec used to rebuild on load."""
        query_features = _input_checks.check_ids(
            self._tower_side(QUERY), query_features, "query_features"
        )
        embeddings = self.query_tower(query_features, training=training)
        if self._query_input_spec is None:  # once the tower took them
            served = query_features
            if _input_checks.predicts_every_position(self.query_tower, query_features):
                # Training rows are not what serving (and an export) takes: record
                # the serving form, if the tower says what it is.
                serving_example = getattr(self.query_tower, "serving_example", None)
                served = serving_example() if callable(serving_example) else None
            if served is not None:
                self._query_input_spec = _serving.input_spec(served)
        return embeddings

    def embed_candidates(self, candidate_features: Any, training: bool = False) -> Tensor:
        """Runs the candidate tower; records the input spec used to rebuild on load."""
        candidate_features = _input_checks.check_ids(
            self._tower_side(CANDIDATE), candidate_features, "candidate_features"
        )
        embeddings = self.candidate_tower(candidate_features, training=training)
        if self._candidate_input_spec is None:  # once the tower took them
            self._candidate_input_spec = _serving.input_spec(candidate_features)
        return embeddings

    def call(self, inputs: Any, training: bool = False) -> Any:
        if not _is_pair(inputs):
            return self.embed_queries(inputs, training=training)
        query_embeddings = self.embed_queries(inputs[QUERY], training=training)
        if len(query_embeddings.shape) == 3 and _input_checks.predicts_every_position(
            self.query_tower, inputs[QUERY]
        ):  # a query at every position of a sequence, as the tower declares
            return self._position_outputs(inputs, query_embeddings, training)
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

    def _position_outputs(
        self, inputs: Mapping[str, Any], query_embeddings: Tensor, training: bool
    ) -> Any:
        """Per-position training: `[rows, length]` pairs flattened into `rows * length`.

        The query tower returned `[rows, length, dim]` (a `SequenceTower` on packed
        rows), and the candidates are `[rows, length]` next-item ids, -1 where
        the row is padded (with dict features, the `candidate_id_key` feature,
        the others `[rows, length, ...]`).
        """
        if self.loss_name == "mse":
            raise ValueError(
                "Per-position training (a query tower that returns [rows, length, dim]) "
                "needs a softmax loss; loss='mse' scores labelled pairs. Use loss="
                "'softmax', 'sampled_softmax' or 'full_softmax'."
            )
        if self.retrieval_metrics:
            raise ValueError(
                "FactorizedTopK metrics rank one query per row; per-position training rows "
                "hold many. Compile without `metrics` and validate with "
                "two_tower.evaluation.RetrievalValidation (next-item ranking) instead."
            )
        candidates = inputs[CANDIDATE]
        ids = ops.reshape(self.task.candidate_ids_of(candidates), (-1,))
        mask = ops.greater_equal(ids, 0)
        rows_shape = tuple(query_embeddings.shape[:2])
        ids_shape = tuple(
            (
                candidates[self.candidate_id_key] if isinstance(candidates, Mapping) else candidates
            ).shape
        )
        if len(ids_shape) != 2 or any(
            a is not None and b is not None and a != b
            for a, b in zip(ids_shape, rows_shape, strict=False)
        ):
            raise ValueError(
                f"The query tower returned one query per position, shape {rows_shape} + (dim,), "
                f"so the candidates must be the next item ids at each position, of shape "
                f"{rows_shape} (-1 where padded). Received candidate ids of shape {ids_shape}."
            )

        def flat(values: Any) -> Any:
            return ops.reshape(values, (-1, *tuple(values.shape[2:])))

        flat_candidates = keras.tree.map_structure(flat, candidates)
        if isinstance(flat_candidates, Mapping):
            flat_candidates = dict(flat_candidates)
            flat_candidates[self.candidate_id_key] = ops.maximum(
                flat_candidates[self.candidate_id_key], 0
            )
        else:
            flat_candidates = ops.maximum(flat_candidates, 0)
        candidate_embeddings = self.embed_candidates(flat_candidates, training=training)
        dim = query_embeddings.shape[-1]
        if dim != candidate_embeddings.shape[-1]:
            raise ValueError(
                f"The query tower's output dim (={dim}) must equal the candidate tower's "
                f"output dim (={candidate_embeddings.shape[-1]})."
            )
        if self._predicting:
            return {
                "query_embeddings": query_embeddings,
                "candidate_embeddings": ops.reshape(
                    candidate_embeddings, (-1, ops.shape(query_embeddings)[1], dim)
                ),
            }
        flat_inputs: dict[str, Any] = {QUERY: inputs[QUERY], CANDIDATE: flat_candidates}
        if SAMPLING_PROBABILITY in inputs:  # (padded positions: 1, so that log q is finite)
            probability = ops.reshape(inputs[SAMPLING_PROBABILITY], (-1,))
            flat_inputs[SAMPLING_PROBABILITY] = ops.where(
                mask, probability, ops.ones_like(probability)
            )
        return self.retrieval_outputs(
            flat_inputs,
            ops.reshape(query_embeddings, (-1, dim)),
            candidate_embeddings,
            training,
            pair_mask=mask,
        )

    def retrieval_outputs(
        self,
        inputs: Mapping[str, Any],
        query_embeddings: Tensor,
        candidate_embeddings: Tensor,
        training: bool = False,
        pair_mask: Tensor | None = None,
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
            pair_mask: per-position training's `[pairs]` booleans, False where
                padded (`call` passes it).

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
            catalogue = self._catalogue.tower_inputs(inputs[CANDIDATE], self.loss_name)
        if "sampled_candidate_ids" in needed:
            ids, embeddings, log_probability = self.task.sample_negatives(
                self.candidate_tower, catalogue, self._negative_seed, training,
                self.negative_sampler,
            )  # fmt: skip
            outputs["sampled_candidate_ids"] = ids
            outputs["sampled_candidate_embeddings"] = embeddings
            outputs["sampled_candidate_log_probability"] = log_probability
        if "catalogue_embeddings" in needed:
            outputs["catalogue_embeddings"] = self.candidate_tower(catalogue, training=training)
        if "metrics_catalogue_embeddings" in needed:
            # Marks an evaluation step: FactorizedTopK metrics update only then.
            outputs["metrics_catalogue_embeddings"] = outputs["catalogue_embeddings"]
        if SAMPLING_PROBABILITY in inputs:
            if self.frequency_estimator is not None:
                raise ValueError(
                    f"x holds '{SAMPLING_PROBABILITY}' and the model has a "
                    "`frequency_estimator`: two sources of the logQ correction. Drop the "
                    "column (e.g. `ShardDataset(sampling_probability=None)`) or the estimator."
                )
            outputs["candidate_sampling_probability"] = inputs[SAMPLING_PROBABILITY]
        if self.frequency_estimator is not None:
            estimate = self.frequency_estimator(
                outputs["candidate_ids"], valid=pair_mask, training=training
            )
            if pair_mask is not None:  # (padded positions: 1, so that log q is finite)
                estimate = ops.where(pair_mask, estimate, ops.ones_like(estimate))
            outputs["candidate_sampling_probability"] = estimate
        if self.negative_cache is not None and not self.negative_cache.built:
            self.negative_cache.build(candidate_embeddings.shape)  # (also in Keras' symbolic build)
        if training and self.negative_cache is not None:
            probability = outputs.get("candidate_sampling_probability")
            outputs["cached_negatives"] = self.negative_cache(
                candidate_embeddings,
                outputs["candidate_ids"],
                None if probability is None else ops.log(ops.cast(probability, "float32")),
                pair_mask,
                training=True,
            )
        if pair_mask is not None:
            outputs["pair_mask"] = pair_mask
        return outputs

    # ---------------------------------------------------------------- scoring
    def compute_similarities(
        self, query_embeddings: Tensor, candidate_embeddings: Tensor
    ) -> Tensor:
        """`[queries, candidates]` scores; the dot product by default."""
        return ops.matmul(query_embeddings, ops.transpose(candidate_embeddings))

    def _search_similarity(self) -> Callable[[Tensor, Tensor], Tensor] | None:
        """What serving hands the index: None (the index's own dot product, which
        `BruteForceIndex` scores its fastest way) unless a subclass overrides
        `compute_similarities`."""
        own = type(self).compute_similarities is TwoTowerRetrieval.compute_similarities
        if own and "compute_similarities" not in vars(self):  # nor set on the instance
            return None
        return self.compute_similarities

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
        self.task.check_outputs(
            y_pred, training=training, ranks_catalogue=bool(self.retrieval_metrics)
        )
        loss = self.compute_retrieval_loss(y, y_pred, sample_weight)
        for extra_loss in self.losses:
            loss = loss + ops.cast(extra_loss, loss.dtype)
        rows = ops.shape(y_pred["query_embeddings"])[0]
        if "pair_mask" in y_pred:  # per-position training: the mean over items
            batch_rows = ops.shape(keras.tree.flatten(x)[0])[0]
            return backend_module().replica_loss(
                loss, position_count(y_pred["pair_mask"]), batch_rows
            )
        return backend_module().replica_loss(loss, rows)

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
                **{
                    key: keras.saving.serialize_keras_object(getattr(self, key))
                    for key in NEGATIVE_LAYERS
                },
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TwoTowerRetrieval:
        config = dict(config)
        for key in ("query_tower", "candidate_tower", "candidate_index"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        for key in NEGATIVE_LAYERS:
            config[key] = keras.saving.deserialize_keras_object(config.get(key))
        for key in ("query_vocabulary", "candidate_vocabulary"):
            config[key] = _vocabularies.deserialize(config.get(key))
        return cls(**config)

    def get_build_config(self) -> dict[str, Any]:
        # Always a config, so that loading calls `build_from_config` and hence
        # `build`, where subclasses create their own weights.
        return {
            "query_input_spec": self._query_input_spec,
            "candidate_input_spec": self._candidate_input_spec,
            "catalogue_spec": self._catalogue.spec(),
        }

    def build_from_config(self, config: dict[str, Any]) -> None:
        query_spec = config.get("query_input_spec")
        candidate_spec = config.get("candidate_input_spec")
        if query_spec is not None:
            self.embed_queries(_serving.symbolic_inputs(query_spec))
        if candidate_spec is not None:
            self.embed_candidates(_serving.symbolic_inputs(candidate_spec))
        catalogue_spec = config.get("catalogue_spec") or {}
        if catalogue_spec:  # the values come with the saved weights
            self._catalogue.create(catalogue_spec)
            self.train_function = self.test_function = self.predict_function = None
        self.build()  # a subclass's own weights (e.g. a learned temperature)
