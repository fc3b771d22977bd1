"""A tower over a dict of features: categorical, multi-valued and numeric."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from two_tower import _arguments
from two_tower.backends import backend_module
from two_tower.distribution import _sharding
from two_tower.sparse.sparse_embedding import SparseEmbedding
from two_tower.towers import _table_growth
from two_tower.types import Tensor

COMBINERS = ("concat", "sum")
BIASES = (None, "learned", "constant")


@keras.saving.register_keras_serializable(package="two_tower")
class FeatureTower(keras.layers.Layer):
    """Embeds a dict of features into one `[batch, dim]` embedding.

    - Categorical features (one index per row, e.g. from `two_tower.Vocabulary`)
      get their own embedding table.
    - Multi-valued features (`[batch, length]` indices, e.g. genres or title
      tokens, padded with -1) are embedded and mean-pooled over the non-padding
      entries; a row with no entries pools to zeros.
    - Numeric features (`[batch]` floats) are used as they are; NaN becomes
      0.0, so a missing value never turns into a NaN embedding.

    `combiner="concat"` concatenates the feature embeddings and the numeric
    values. `combiner="sum"` adds the feature embeddings, plus a learned vector
    per numeric feature scaled by its value (a factorization-machine style
    tower; with only an id feature and `output_dim=None` it is a plain id
    embedding). The result goes
    through an optional MLP (`hidden_units`, ReLU), a final Dense to
    `output_dim` (skipped when `output_dim` is None), and optionally L2
    normalisation.

    `bias` appends a last column, as `IdEmbeddingTower` does: `"learned"` adds
    one learned scalar per feature value (pooled like the embeddings, and a
    learned weight per numeric feature), `"constant"` a column of ones. A
    candidate tower with `"learned"` and a query tower with `"constant"` give
    every candidate a learned popularity term in the dot product.

    Indices must lie in `[0, vocabulary size)`; `Vocabulary` guarantees that
    for raw values, so unseen values never crash a gather.

    Args:
        categorical: feature name -> vocabulary size.
        multivalued: feature name -> vocabulary size (padding is -1).
        numeric: names of float features.
        embedding_dim: width of every embedding table.
        hidden_units: widths of the ReLU layers before the output.
        output_dim: width of the final Dense layer; None leaves it out (the
            output is then the combined embedding, or the last hidden layer).
        l2_normalize: L2-normalise the output (for cosine scoring); the bias
            column, if any, is appended after.
        l2: L2 penalty on every embedding and bias table, added to the model's
            loss; or feature name -> penalty (features left out get none).
            Shared tables (genres, age buckets) see a gradient in every batch,
            while a single id's row sees one rarely, so they often need a
            larger penalty.
        combiner: `"concat"` or `"sum"`.
        bias: None, `"learned"` or `"constant"`.
        sparse: make every embedding and bias table a
            `two_tower.SparseEmbedding`, so that `TwoTowerRetrieval.fit`
            updates only the rows a batch looks up (`l2` then applies to those
            rows; padding positions of multi-valued features look up row 0 with
            a zero gradient). The Dense layers train as usual.
        table_rows: table layer name -> rows, for tables given more rows than
            their feature's size. Set when the tower builds under a
            `keras.distribution.ModelParallel` (see `IdEmbeddingTower`); kept
            in the config so a saved model reloads with the same shapes. Leave
            it None.
        **kwargs: standard `keras.layers.Layer` arguments.

    Raises:
        ValueError: no feature, a name used twice, an option out of range
            (sizes, `l2`, `combiner`, `bias`, `table_rows`) or of the wrong
            type (`sparse`, `l2_normalize` that are not True or False), or
            `sparse=True` on a tower with no table (numeric features only). NumPy
            scalars (`np.int64(21)`) are accepted as numbers.

    Examples:
        >>> import numpy as np
        >>> tower = two_tower.FeatureTower(
        ...     categorical={"occupation": 21}, multivalued={"genres": 19},
        ...     numeric=["age"], output_dim=8)
        >>> features = {"occupation": np.array([3, 5]), "age": np.array([0.2, np.nan]),
        ...             "genres": np.array([[1, 4, -1], [-1, -1, -1]])}
        >>> tuple(tower(features).shape)
        (2, 8)
        >>> summed = two_tower.FeatureTower(
        ...     categorical={"occupation": 21}, multivalued={"genres": 19},
        ...     combiner="sum", output_dim=None, embedding_dim=4, bias="learned")
        >>> tuple(summed(features).shape)
        (2, 5)
    """

    def __init__(
        self,
        categorical: Mapping[str, int] | None = None,
        multivalued: Mapping[str, int] | None = None,
        numeric: Sequence[str] = (),
        embedding_dim: int = 32,
        hidden_units: Sequence[int] = (),
        output_dim: int | None = 32,
        l2_normalize: bool = False,
        l2: float | Mapping[str, float] = 0.0,
        combiner: str = "concat",
        bias: str | None = None,
        sparse: bool = False,
        table_rows: Mapping[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.categorical = dict(categorical or {})
        self.multivalued = dict(multivalued or {})
        self.numeric = list(numeric)
        names = [*self.categorical, *self.multivalued, *self.numeric]
        if not names:
            raise ValueError("FeatureTower needs at least one feature.")
        if len(set(names)) != len(names):
            raise ValueError(f"Feature names must be distinct. Received: {names}")
        owner = "FeatureTower"
        # Python values (NumPy scalars accepted), so that the config stays JSON.
        for table_features in (self.categorical, self.multivalued):
            for name, size in table_features.items():
                try:
                    table_features[name] = _arguments.integer(f"{name!r} size", size)
                except ValueError:
                    raise ValueError(
                        f"Vocabulary size of feature {name!r} must be a positive integer. "
                        f"Received: {size!r}"
                    ) from None
        embedding_dim = _arguments.integer("embedding_dim", embedding_dim, owner=owner)
        if output_dim is not None:
            output_dim = _arguments.integer("output_dim", output_dim, owner=owner)
        hidden_units = [
            _arguments.integer("hidden_units", units, owner=owner) for units in hidden_units
        ]
        l2_normalize = _arguments.boolean("l2_normalize", l2_normalize, owner=owner)
        penalties = dict(l2) if isinstance(l2, Mapping) else dict.fromkeys(names, l2)
        for name, penalty in penalties.items():
            try:
                penalties[name] = _arguments.number("l2", penalty, minimum=0)
            except ValueError:
                raise ValueError(
                    f"`l2` must be a finite number >= 0. Received: l2={l2!r}"
                ) from None
            if name not in names:
                raise ValueError(f"`l2` names an unknown feature {name!r}. Features: {names}")
        if not isinstance(l2, Mapping):
            l2 = penalties[names[0]]
        if combiner not in COMBINERS:
            raise ValueError(f"`combiner` must be one of {COMBINERS}. Received: {combiner!r}")
        if bias not in BIASES:
            raise ValueError(f"`bias` must be one of {BIASES}. Received: bias={bias!r}")
        sparse = _arguments.boolean("sparse", sparse, owner=owner)
        if sparse and not (self.categorical or self.multivalued):
            raise ValueError(
                "FeatureTower: `sparse=True` makes the embedding tables of categorical and "
                "multivalued features row-sparse, but this tower has none (numeric "
                f"features {self.numeric} only), so it would change nothing. Leave `sparse` "
                "out, or add a categorical feature."
            )
        self.embedding_dim = embedding_dim
        self.hidden_units = list(hidden_units)
        self.output_dim = output_dim
        self.l2_normalize = l2_normalize
        self.l2 = dict(penalties) if isinstance(l2, Mapping) else l2
        self.combiner = combiner
        self.bias = bias
        self.sparse = sparse
        self.table_rows = dict(table_rows) if table_rows else None
        tables = {**self.categorical, **self.multivalued}

        def table(feature: str, kind: str, width: int, initializer: str) -> keras.layers.Layer:
            penalty = penalties.get(feature, 0.0)
            layer = SparseEmbedding if sparse else keras.layers.Embedding
            return layer(
                tables[feature],
                width,
                embeddings_initializer=initializer,
                embeddings_regularizer=keras.regularizers.L2(penalty) if penalty else None,
                name=f"{feature}_{kind}",
            )

        self.embeddings = {
            name: table(name, "embedding", embedding_dim, "uniform") for name in tables
        }
        self.numeric_projection = (
            keras.layers.Dense(embedding_dim, use_bias=False, name="numeric_projection")
            if combiner == "sum" and self.numeric
            else None
        )
        self.biases = (
            {name: table(name, "bias", 1, "zeros") for name in tables} if bias == "learned" else {}
        )
        self.numeric_bias = (
            keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros", name="numeric_bias")
            if bias == "learned" and self.numeric
            else None
        )
        sizes = {layer.name: layer.input_dim for layer in self._tables()}
        table_rows = self.table_rows or {}
        for name, rows in table_rows.items():
            if name not in sizes:
                raise ValueError(
                    f"`table_rows` names an unknown table {name!r}. Tables: {sorted(sizes)}"
                )
            try:
                table_rows[name] = _arguments.integer(name, rows, minimum=sizes[name])
            except ValueError:
                raise ValueError(
                    f"`table_rows` of table {name!r} must be an integer >= {sizes[name]}, its "
                    f"feature's size. Received: {rows!r}"
                ) from None
        self.hidden = [keras.layers.Dense(units, activation="relu") for units in hidden_units]
        self.output_layer = keras.layers.Dense(output_dim) if output_dim is not None else None

    pads_tables = True  # see `two_tower.distribution._sharding`

    def _tables(self) -> list[keras.layers.Layer]:
        return [*self.embeddings.values(), *self.biases.values()]

    def build(self, input_shape: Any = None) -> None:
        padded = _sharding.pad_tables({t.name: t for t in self._tables()}, self.table_rows)
        if padded:
            self.table_rows = padded
        for layer in self._tables():
            layer.build((None,))
        for layer in (self.numeric_projection, self.numeric_bias):
            if layer is not None:
                layer.build((None, len(self.numeric)))
        if self.combiner == "sum":
            width = self.embedding_dim
        else:
            width = self.embedding_dim * len(self.embeddings) + len(self.numeric)
        for layer in self.hidden:
            layer.build((None, width))
            width = layer.units
        if self.output_layer is not None:
            self.output_layer.build((None, width))
        self.built = True

    def __call__(self, features: Any, *args: Any, **kwargs: Any) -> Any:
        # Before Keras converts the inputs, which fails on ragged rows with a
        # message that names no feature.
        if isinstance(features, Mapping):
            features = {name: _rectangular(name, value) for name, value in features.items()}
            self.check_feature_ranges(features)
        else:
            # Keras would convert it first, failing in each backend's own words.
            self._refuse_array(features)
        return super().__call__(features, *args, **kwargs)

    def _refuse_array(self, features: Any) -> None:
        names = [*self.categorical, *self.multivalued, *self.numeric]
        kind = getattr(features, "dtype", type(features).__name__)
        raise ValueError(
            f"FeatureTower {self.name!r} takes a dict of features {names}. Received "
            f"{type(features).__name__} of {kind}."
        )

    def table_sizes(self) -> dict[str, int]:
        """Feature name -> the ids its table takes (categorical and multi-valued)."""
        return {**self.categorical, **self.multivalued}

    def grow(self, sizes: Mapping[str, int]) -> None:
        """Gives the named features' tables more ids: old rows kept, new rows initialised.

        Each feature's embedding (and bias) table gets the new rows, unless
        `table_rows` already holds them. A model's optimizer state must
        follow: grow through `TwoTowerRetrieval.grow_tables`, which does both.

        Args:
            sizes: feature name -> its new vocabulary size, at least the
                current one; features left out keep theirs.

        Raises:
            ValueError: a name that is not a categorical or multi-valued
                feature, or a size below the current one. Nothing grows then.

        Examples:
            >>> tower = two_tower.FeatureTower(categorical={"city": 5}, output_dim=4)
            >>> tower.grow({"city": 8})
            >>> tower.table_sizes()
            {'city': 8}
        """
        current = self.table_sizes()
        checked = _table_growth.checked_sizes(f"FeatureTower {self.name!r}", current, sizes)
        rows = dict(self.table_rows or {})
        for name, size in checked.items():
            tables = [self.embeddings[name], *([self.biases[name]] if self.biases else [])]
            for table in tables:
                if table.built:
                    new_rows = _table_growth.padded_rows(size, int(table.input_dim))
                    _table_growth.grow_embedding(table, current[name], size, new_rows)
                else:
                    new_rows = max(size, rows.get(table.name, 0))
                    table.input_dim = size
                if new_rows > size:
                    rows[table.name] = new_rows
                else:
                    rows.pop(table.name, None)
            (self.categorical if name in self.categorical else self.multivalued)[name] = size
        self.table_rows = rows or None
        backend_module().variables_replaced(self)

    def id_range(self) -> None:
        """None: the tower takes a dict of features (see `two_tower.towers.tower_ids`)."""
        return None

    def check_feature_ranges(self, features: Any, where: str = "features") -> None:
        """Checks NumPy-like features on the host: indices in range, one row count.

        JAX gathers out-of-range ids silently (a NaN or a wrong row), while
        TensorFlow and torch raise deep inside the step, each in its own words;
        this raises the same error on every backend first. Tensors are skipped.

        Args:
            features: feature name -> array.
            where: how the caller names `features` in the error.

        Raises:
            ValueError: features that are not a dict; a categorical index outside `[0, size)`, a
                multi-valued index of `size` or more (negative values are
                padding), or features with different row counts.
        """
        if not isinstance(features, Mapping):
            self._refuse_array(features)
        rows: dict[str, int] = {}
        for name, value in features.items():
            if not isinstance(value, (np.ndarray, list, tuple)):
                continue
            array = np.asarray(value)
            if array.ndim:
                rows[name] = array.shape[0]
            size = self.categorical.get(name, self.multivalued.get(name))
            if size is None or array.size == 0 or array.dtype.kind not in "iu":
                continue
            low, high = int(array.min()), int(array.max())
            low_ok = low >= 0 if name in self.categorical else True
            if not low_ok or high >= size:
                allowed = f"[0, {size})" + ("" if name in self.categorical else " or -1 padding")
                raise ValueError(
                    f"Feature {name!r} in {where} must hold indices in {allowed} (its "
                    f"vocabulary size is {size}). Received values from {low} to {high}."
                )
        if len(set(rows.values())) > 1:
            counts = ", ".join(f"{name!r}: {count}" for name, count in rows.items())
            raise ValueError(
                f"The features in {where} must have one row per example, the same number "
                f"in each. Received {counts}."
            )

    def _feature(self, features: Mapping[str, Any], name: str, rank: int) -> Tensor:
        if name not in features:
            raise ValueError(f"Feature {name!r} is missing. Received features: {sorted(features)}")
        value = ops.convert_to_tensor(features[name])
        if len(value.shape) == rank + 1 and rank == 1 and value.shape[-1] == 1:
            value = ops.squeeze(value, axis=-1)  # [batch, 1] is a scalar per row too
        if len(value.shape) != rank:
            kind = "one value per row, shape [batch]" if rank == 1 else "shape [batch, length]"
            raise ValueError(
                f"Feature {name!r} must have {kind}. Received shape {tuple(value.shape)}"
            )
        return value

    def call(self, features: Mapping[str, Any]) -> Tensor:
        if not isinstance(features, Mapping):
            raise ValueError(
                f"FeatureTower takes a dict of features. Received {type(features).__name__}"
            )
        parts, biases = [], []
        for name in self.categorical:
            value = self._feature(features, name, rank=1)
            _check_integer(name, value)
            parts.append(self.embeddings[name](value))
            if name in self.biases:
                biases.append(self.biases[name](value))
        for name in self.multivalued:
            value = self._feature(features, name, rank=2)
            _check_integer(name, value)
            present = ops.expand_dims(ops.cast(ops.greater_equal(value, 0), "float32"), -1)
            count = ops.maximum(ops.sum(present, axis=1), 1.0)
            index = ops.maximum(value, 0)
            parts.append(ops.sum(self.embeddings[name](index) * present, axis=1) / count)
            if name in self.biases:
                biases.append(ops.sum(self.biases[name](index) * present, axis=1) / count)
        if self.numeric:
            columns = []
            for name in self.numeric:
                value = ops.cast(self._feature(features, name, rank=1), "float32")
                columns.append(ops.where(ops.isnan(value), ops.zeros_like(value), value))
            numeric = ops.stack(columns, axis=-1)
            if self.numeric_projection is not None:
                parts.append(self.numeric_projection(numeric))
            else:
                parts.append(numeric)
            if self.numeric_bias is not None:
                biases.append(self.numeric_bias(numeric))
        if self.combiner == "sum":
            hidden = parts[0]
            for part in parts[1:]:
                hidden = hidden + part
        else:
            hidden = ops.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        for layer in self.hidden:
            hidden = layer(hidden)
        output = self.output_layer(hidden) if self.output_layer is not None else hidden
        if self.l2_normalize:
            output = output / ops.maximum(ops.norm(output, axis=-1, keepdims=True), 1e-12)
        if self.bias == "learned":
            total = biases[0]
            for extra in biases[1:]:
                total = total + extra
            output = ops.concatenate([output, ops.cast(total, output.dtype)], axis=-1)
        elif self.bias == "constant":
            output = ops.concatenate([output, ops.ones_like(output[:, :1])], axis=-1)
        return output

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "categorical": self.categorical,
                "multivalued": self.multivalued,
                "numeric": self.numeric,
                "embedding_dim": self.embedding_dim,
                "hidden_units": self.hidden_units,
                "output_dim": self.output_dim,
                "l2_normalize": self.l2_normalize,
                "l2": self.l2,
                "combiner": self.combiner,
                "bias": self.bias,
                "sparse": self.sparse,
                "table_rows": self.table_rows,
            }
        )
        return config


def _rectangular(name: str, value: Any) -> Any:
    """Lists and object arrays as NumPy arrays; ragged rows raise, naming the feature."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "US":
        raise ValueError(
            f"Feature {name!r} holds strings (dtype {value.dtype}); map raw values to "
            "indices with two_tower.Vocabulary first."
        )
    is_object_array = isinstance(value, np.ndarray) and value.dtype.kind == "O"
    if not isinstance(value, (list, tuple)) and not is_object_array:
        return value
    try:
        array = np.asarray(value.tolist() if isinstance(value, np.ndarray) else value)
    except ValueError:
        array = None
    if array is not None and array.dtype.kind in "US":
        return _rectangular(name, array)
    if array is None or array.dtype == object:
        raise ValueError(
            f"Feature {name!r} is ragged (rows of different lengths). Pad multi-valued "
            "features to [batch, length] with -1."
        )
    return array


def _check_integer(name: str, value: Tensor) -> None:
    dtype = keras.backend.standardize_dtype(value.dtype)
    if not (dtype.startswith("int") or dtype.startswith("uint")):
        raise ValueError(
            f"Feature {name!r} must hold integer indices (map raw values with "
            f"two_tower.Vocabulary). Received dtype {dtype}"
        )
