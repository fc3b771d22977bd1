"""`TwoTowerRetrieval`'s serving methods: the catalogue, the index, and top-k search."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from two_tower import _arguments
from two_tower.backends import backend_module
from two_tower.export import _plan, write_artefact
from two_tower.models import _input_checks, _serving, _vocabularies
from two_tower.models.retrieval_outputs import CANDIDATE, QUERY
from two_tower.preprocessing.vocabulary import Vocabulary
from two_tower.retrieval._catalogue_store import is_batches
from two_tower.towers.tower_ids import grows_tables

# mypy sees Keras' `Model` as the base; at run time the mixin is plain.
_Base: Any = keras.Model if TYPE_CHECKING else object


class Serving(_Base):
    """Indexing and top-k search over the candidates, safe from many threads.

    A mixin of `TwoTowerRetrieval` (before `keras.Model` in its bases): the
    catalogue of dict candidate features (`set_catalogue`), `index_candidates`,
    `recommend` and `similar_items`. The towers and the search run compiled
    (`two_tower.models._serving`), reading the variables live.
    """

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
        vocabularies, tower, name = (
            (self.query_vocabulary, self.query_tower, "query_vocabulary")
            if side == QUERY
            else (self.candidate_vocabulary, self.candidate_tower, "candidate_vocabulary")
        )
        encoded = _vocabularies.encode(vocabularies, features, argument, name)
        growing = grows_tables(tower) if vocabularies is not None else None
        if growing is not None:
            _vocabularies.check_outgrown(vocabularies, encoded, growing.table_sizes(), name)
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
                self._tower_side(CANDIDATE), {self.candidate_id_key: ids}, argument
            )[self.candidate_id_key]
        return self._catalogue.rows(positions), ids

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
        if own_tower and self._catalogue.takes_rows(features) and not is_batches(features):
            rows, raw_ids = self._catalogue_rows(features, argument)
            return rows, raw_ids if ids is None else ids
        if is_batches(features):
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

    def _check_structure(self, features: Any, side: str, argument: str, hint: str = "") -> None:
        spec = self._query_input_spec if side == QUERY else self._candidate_input_spec
        if not is_batches(features):
            _input_checks.check_structure(spec, features, side, argument, hint)

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
        if self._catalogue.set(features):
            # Compiled steps traced before now do not read the new variables.
            self.train_function = self.test_function = self.predict_function = None

    def _query_function(self) -> _serving.TowerFunction:
        """The query tower through `call`, as `predict` would run it."""

        def call(inputs: Any) -> Any:
            return self(inputs, training=False)

        return _serving.TowerFunction(
            "queries",
            call,
            self,
            self.query_tower,
            self._tower_side(QUERY),
            self._serving_functions,
        )

    def _candidate_function(
        self, item_tower: keras.layers.Layer | None = None
    ) -> _serving.TowerFunction:
        """`embed_candidates`, or `item_tower` over candidate ids or features."""
        side = self._tower_side(CANDIDATE)
        if item_tower is not None:
            key = ("item_tower", id(item_tower))
            return _serving.TowerFunction(
                key, item_tower, item_tower, item_tower, side, self._serving_functions
            )
        return _serving.TowerFunction(
            "candidates",
            self.embed_candidates,
            self,
            self.candidate_tower,
            side,
            self._serving_functions,
        )

    def index_candidates(
        self,
        candidates: Any = None,
        candidate_ids: Any = None,
        batch_size: int = 4096,
        *,
        attributes: Mapping[str, Any] | None = None,
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
            attributes: per-candidate values that `recommend(where=...)` and
                `similar_items(where=...)` filter on, `{name: one value per
                indexed candidate}`, in the order of the candidates (see
                `BruteForceIndex.index`).

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
            if not self._catalogue and not isinstance(self.candidate_vocabulary, Vocabulary):
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
            if self._catalogue:
                candidates = self._catalogue.values(known)
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
            blocks = _serving.embedded_blocks(
                self._candidate_function(), candidates, batch_size, "candidates"
            )
            options = _serving.filter_options(self.candidate_index, "index", attributes=attributes)
            self.candidate_index.index(blocks, candidate_ids, **options)

    def recommend(
        self,
        queries: Any,
        k: int = 10,
        *,
        exclude: Sequence[Any] | None = None,
        ignore_unknown_exclusions: bool = False,
        return_scores: bool = False,
        batch_size: int = 1024,
        allow: Sequence[Any] | None = None,
        where: Mapping[str, Any] | None = None,
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
            ignore_unknown_exclusions: skip excluded (and allowed) ids that are
                not indexed instead of raising.
            return_scores: also return the `[queries, k]` scores.
            batch_size: queries embedded at once.
            allow: one sequence of candidate ids (or None) per query: that
                query returns only these.
            where: conditions on the attributes given to `index_candidates`,
                for every query, e.g. `{"category": [2, 7], "in_stock": True,
                "price": {"max": 20.0}}`. With `allow` or `where`, a query with
                fewer than k candidates left gets padding (score `-inf`, id -1
                or `""`); see `BruteForceIndex.search`.

        Returns:
            `[queries, k]` ids (NumPy, dtype of the indexed ids), or `(ids,
            scores)` when `return_scores` is true.

        Raises:
            ValueError: if nothing is indexed, `queries` is empty or holds bad
                ids, `k` or `batch_size` is out of range, a flag is not a bool,
                or `exclude` is malformed, names unknown ids, or leaves fewer
                than `k` candidates (see `BruteForceIndex.search`).
        """
        _serving.require_index(self.candidate_index)
        _serving.check_flags(
            return_scores=return_scores, ignore_unknown_exclusions=ignore_unknown_exclusions
        )
        filters = _serving.filter_options(self.candidate_index, "search", allow=allow, where=where)
        if not is_batches(queries):
            queries = self._encode(QUERY, queries, "`queries`")
            self._check_structure(queries, QUERY, "`queries`")
        with backend_module().serving_slot():
            query_embeddings = _serving.embed_rows(
                self._query_function(), queries, batch_size, "queries"
            )
            ids, scores = self.candidate_index.search(
                query_embeddings,
                k=k,
                similarity_fn=self._search_similarity(),
                exclude=exclude,
                ignore_unknown_exclusions=ignore_unknown_exclusions,
                **filters,
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
        allow: Sequence[Any] | None = None,
        where: Mapping[str, Any] | None = None,
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
            allow: one sequence of candidate ids (or None) per item: only
                these may come back for it.
            where: conditions on the indexed attributes (see `recommend`).

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
        filters = _serving.filter_options(self.candidate_index, "search", allow=allow, where=where)
        items, item_ids = self._candidate_inputs(
            items, item_ids, "`items`", own_tower=item_tower is None
        )
        with backend_module().serving_slot():
            found, scores = _serving.similar_items(
                self.candidate_index,
                self._candidate_function(item_tower),
                self._search_similarity(),
                items,
                k,
                item_ids=item_ids,
                exclude_self=exclude_self,
                exclude=exclude,
                ignore_unknown_exclusions=ignore_unknown_exclusions,
                batch_size=batch_size,
                filters=filters,
            )
        return (found, scores) if return_scores else found

    def export(
        self,
        filepath: Any,
        format: str = "tf_saved_model",
        verbose: bool | None = None,
        input_signature: Any = None,
        *,
        max_k: int | None = None,
        exclusion_padding: int | str | None = None,
        **kwargs: Any,
    ) -> None:
        """Exports the query tower and the exact index as one artefact to serve outside Python.

        Unlike Keras' `Model.export`, which exports `call`, the artefact answers
        `recommend`: given query features, `k` and per-request exclusions, it
        returns the top-k candidate ids and scores, the same ids as `recommend`
        (ties broken by catalogue position), with no Python or Keras at serving
        time. See `docs/export.md`.

        - `"tf_saved_model"`: a SavedModel folder (for TF Serving, put it under a
          version folder, e.g. `models/retrieval/1`) with a `serving_default`
          signature.
        - `"onnx"`: an ONNX file for ONNX Runtime (opset 18 and ONNX-ML's
          `LabelEncoder`); when it would pass 1 GiB, the catalogue goes beside it
          as `<file>.<token>.data` (ONNX external data: keep the two together).

        Inputs: the query features under their names (`query` for a tower over
        one array; each feature of a dict), as raw values (int64 or strings)
        where the model has a `query_vocabulary` (an unknown value goes to OOV
        bucket 0), else as the tower takes them; `k`, an int32 scalar in `[1,
        max_k]`; and `exclude`, `[queries, n]` candidate ids (int64 or strings,
        like the indexed ids; n may be 0), one row per query, padded with
        `exclusion_padding`. Unknown ids in `exclude` are ignored. Outputs: `ids`
        and `scores`, `[queries, k]`. Where a query's exclusions leave fewer than
        `k` candidates, its last results are `exclusion_padding` with score
        `-inf`. A `k` outside `[1, max_k]`, or an `exclude` without one row per
        query, fails the SavedModel call; ONNX has no assertions, so ONNX Runtime
        clamps `k` into that range (and fails on too few `exclude` rows).

        The export traces the query tower and `compute_similarities` with
        TensorFlow: on JAX and torch a TensorFlow process does it, which imports
        the modules of the model's own classes and loads a `.keras` copy, so
        every layer class must be importable from a module (not defined in
        `__main__` or a notebook). Needs `pip install "two-tower[export]"`
        (TensorFlow, tf2onnx, onnx).

        The catalogue is scored in blocks of the index's `chunk_size` per
        request. Its embeddings are variables (SavedModel) or initializers
        (ONNX, beside the file when large), so their limit is memory; what
        stays inside the graph must fit protobuf's 2 GB, which `export` checks:
        the id lookups, and in ONNX the query tower's weights (see
        `docs/export.md`).

        Args:
            filepath: the SavedModel folder, or the `.onnx` file, to write (an
                existing artefact is replaced once the new one is complete; a
                folder holding anything but a SavedModel is refused).
            format: `"tf_saved_model"` or `"onnx"`.
            verbose: print where the artefact went (default: True).
            input_signature: must be None: the inputs come from the model's
                query tower and vocabularies.
            max_k: the largest `k` a request may ask for, at most the number of
                indexed candidates; defaults to 100, or to that number when
                smaller.
            exclusion_padding: the value that pads `exclude` rows; defaults to
                -1 for integer ids and `""` for string ids. It must not be an
                indexed id.
            **kwargs: none are accepted (Keras' other export options do not
                apply).

        Raises:
            ValueError: an unknown format or option, nothing indexed, an index
                other than `BruteForceIndex` (an approximate index has no
                TensorFlow or ONNX operation) or one that scores in mixed
                precision, a model never called on queries, a query vocabulary
                with several OOV buckets, query features named like the
                signature's own (`k`, `exclude`, ...), a bad `max_k` or
                `exclusion_padding`, a target folder that is not a SavedModel or
                an ONNX path not ending in `.onnx`, more than 2 GB to hold
                inside the graph, or (on JAX and torch) layer classes that a new
                process cannot import.
            ImportError: TensorFlow (or, for ONNX, tf2onnx and onnx) is missing.
            RuntimeError: the TensorFlow process failed (its error is quoted).

        Examples:
            >>> import importlib.util, tempfile, numpy as np
            >>> model = two_tower.TwoTowerRetrieval.from_ids(5, 8)
            >>> model.index_candidates(np.arange(8))
            >>> model.recommend(np.array([0, 1]), k=3).shape
            (2, 3)
            >>> if importlib.util.find_spec("tensorflow"):  # the export extra
            ...     model.export(tempfile.mkdtemp() + "/retrieval/1", verbose=False)
        """
        if input_signature is not None:
            raise ValueError(
                "TwoTowerRetrieval.export derives its inputs from the query tower and "
                f"vocabularies: `input_signature` must be None. Received {input_signature!r}"
            )
        if kwargs:
            raise ValueError(
                f"TwoTowerRetrieval.export takes no further options. Received {sorted(kwargs)}"
            )
        format = _arguments.choice("format", format, _plan.FORMATS, owner="export")
        verbose = True if verbose is None else _arguments.boolean("verbose", verbose)
        plan = _plan.plan(
            self.candidate_index,
            self._query_input_spec,
            self.query_vocabulary,
            max_k=max_k,
            exclusion_padding=exclusion_padding,
        )
        target = write_artefact(self, plan, filepath, format)
        if verbose:
            print(f"Exported a {format} artefact to {target} ({len(plan.ids)} candidates).")
