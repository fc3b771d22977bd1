"""A query tower over the user's recent items, sharing the candidate tower's item table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
from keras import ops

from two_tower import _arguments
from two_tower.towers._item_table import SharedItemTable
from two_tower.types import Tensor

POOLINGS = ("mean", "recency", "attention", "gru")
AGE_POOLINGS = ("recency", "attention")  # the poolings that read `age_key`
BIASES = (None, "constant")


@keras.saving.register_keras_serializable(package="two_tower")
class HistoryTower(SharedItemTable, keras.layers.Layer):
    """Embeds a query from the items its user interacted with before the request.

    The input is a dict holding `history`: `[batch, max_length]` item indices,
    the most recent first and padded with -1 after the last item (what
    `two_tower.InteractionLog.history` returns). The items are embedded with an
    item table, pooled into one vector, and projected:

    - `pooling="mean"`: the mean of the present items.
    - `"recency"`: a softmax-weighted mean with one learned weight per position
      (position 0 is the most recent item), so recent items can count more.
    - `"attention"`: as `"recency"`, plus a learned score of each item's
      embedding, so the weights depend on what the items are.
    - `"gru"`: a GRU read from the oldest to the most recent item; its last
      state is the pooled vector.

    With `age_key` (`"recency"` and `"attention"` only: the other poolings
    would ignore it), the dict also holds `[batch, max_length]` ages (request
    time minus interaction time, `InteractionLog.history(..., ages=True)`),
    and the weights get a learned term in `log(1 + age)`: items from long ago
    can count less than the position alone says. Ages must be finite and not
    negative where the history holds an item; at padded positions they may
    hold anything, NaN included (they are masked before use). An empty
    history pools to zeros.

    **The item table.** With `num_items=None` the tower has no table of its own:
    `TwoTowerRetrieval` gives it the candidate tower's id table (the table of
    an `IdEmbeddingTower`, a `keras.layers.Embedding`, or the
    `candidate_id_key` table of a `FeatureTower`). A history item is then
    embedded by the same row that scores it as a candidate, so a new user with
    a few interactions gets a query from rows trained on every user. With
    `num_items` set, the tower owns a table of that many rows.

    `context`, a tower over the other query features (a `FeatureTower` on
    user features, say), is added to the projected history. `bias="constant"`
    appends a column of ones, to meet a candidate tower's learned bias column
    (`IdEmbeddingTower(bias="learned")`).

    Args:
        num_items: rows of the tower's own item table; None shares the
            candidate tower's table (set by `TwoTowerRetrieval`).
        embedding_dim: width of the own item table; with a shared table, None
            or the shared table's width.
        max_length: columns of the history input (the `width` given to
            `InteractionLog.history`).
        pooling: `"mean"`, `"recency"`, `"attention"` or `"gru"`.
        history_key: the feature holding the history.
        age_key: the feature holding the ages, or None to use positions only.
            Only with `pooling="recency"` or `"attention"`.
        context: a layer over the query features whose `[batch, dim]` output is
            added to the pooled history; None adds nothing.
        project: pass the pooled vector through a learned square matrix
            (initialised to the identity), so that a history need not score
            its own items highest.
        bias: None, or `"constant"` to append a column of ones.
        l2: L2 penalty on the own item table; 0 with a shared table (which
            keeps its own candidate-tower penalty).
        **kwargs: standard `keras.layers.Layer` arguments.

    Raises:
        ValueError: an option out of range (`num_items`, `embedding_dim`,
            `max_length`, `pooling`, `bias`, `l2`, `project`, keys; Python and
            NumPy numbers are accepted), an option the configuration would
            ignore (`age_key` with `pooling="mean"` or `"gru"`, `l2` > 0 with
            `num_items=None`), or, when the model shares the candidate table,
            a candidate tower without one table of ids or whose width differs
            from `embedding_dim`.

    Call arguments:
        - `features`: a dict (not a bare array) with `history_key`
          (`[batch, max_length]` integer indices, the most recent first, -1
          padding after the last item), `age_key` when set, and what
          `context` reads. NumPy arrays and rectangular lists are checked on
          the host (`check_feature_ranges`), the same on every backend.

    Call returns:
        `[batch, dim]`, or `[batch, dim + 1]` with `bias="constant"`.

    Examples:
        >>> import numpy as np
        >>> tower = two_tower.HistoryTower(num_items=10, embedding_dim=4, max_length=3)
        >>> history = np.array([[3, 1, -1], [-1, -1, -1]])
        >>> tuple(tower({"history": history}).shape)
        (2, 4)
        >>> items = two_tower.IdEmbeddingTower(10, embedding_dim=4, bias="learned")
        >>> model = two_tower.TwoTowerRetrieval(
        ...     two_tower.HistoryTower(max_length=3, bias="constant"), items,
        ...     loss="full_softmax", catalogue_size=10)
        >>> model.query_tower.item_table is items.embedding
        True
    """

    def __init__(
        self,
        num_items: int | None = None,
        embedding_dim: int | None = None,
        max_length: int = 32,
        pooling: str = "recency",
        history_key: str = "history",
        age_key: str | None = None,
        context: keras.layers.Layer | None = None,
        project: bool = True,
        bias: str | None = None,
        l2: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = "HistoryTower"
        num_items, embedding_dim = self._table_arguments(num_items, embedding_dim, owner)
        max_length = _arguments.integer("max_length", max_length, owner=owner)
        pooling = _arguments.choice("pooling", pooling, POOLINGS, owner=owner)
        if bias not in BIASES:
            raise ValueError(
                f"HistoryTower: `bias` must be None or 'constant'. Received: bias={bias!r} "
                f"({type(bias).__name__})"
            )
        l2 = _arguments.number("l2", l2, minimum=0.0, owner=owner)
        project = _arguments.boolean("project", project, owner=owner)
        for name, key in (("history_key", history_key), ("age_key", age_key)):
            if not (isinstance(key, str) and key) and not (key is None and name == "age_key"):
                raise ValueError(
                    f"HistoryTower: `{name}` must be a non-empty string. Received: {key!r}"
                )
        if age_key == history_key:
            raise ValueError(
                f"HistoryTower: `age_key` and `history_key` must differ. Both are {age_key!r}"
            )
        if age_key is not None and pooling not in AGE_POOLINGS:
            raise ValueError(
                f"HistoryTower: `age_key` applies to pooling='recency' and 'attention', whose "
                f"weights get a learned term in the ages; pooling={pooling!r} would ignore the "
                f"ages. Received: age_key={age_key!r}, pooling={pooling!r}. Use "
                "pooling='recency' or 'attention', or leave age_key None."
            )
        if l2 and num_items is None:
            raise ValueError(
                "HistoryTower: `l2` penalises the tower's own item table (num_items set); with "
                "num_items=None the tower shares the candidate tower's table, which keeps its "
                f"own penalty, so l2 would be ignored. Received: l2={l2}. Set the penalty on the "
                "candidate tower (e.g. IdEmbeddingTower(l2=...)), or give this tower its own "
                "table with `num_items`."
            )
        if context is not None and not isinstance(context, keras.layers.Layer):
            raise ValueError(
                "HistoryTower: `context` must be a Keras layer or None. Received "
                f"{type(context).__name__}"
            )
        self.num_items = num_items
        self.embedding_dim = embedding_dim
        self.max_length = max_length
        self.pooling = pooling
        self.history_key = history_key
        self.age_key = age_key
        self.context = context
        self.project = project
        self.bias = bias
        self.l2 = l2
        own = None
        if num_items is not None:
            assert embedding_dim is not None
            own = keras.layers.Embedding(
                num_items,
                embedding_dim,
                embeddings_regularizer=keras.regularizers.L2(l2) if l2 else None,
                name="item_embedding",
            )
        self.own_table = own
        self._init_shared_table()
        self.gru = (
            keras.layers.GRU(embedding_dim or 1, go_backwards=True, name="gru")
            if pooling == "gru" and embedding_dim
            else None
        )
        self.projection: keras.layers.Dense | None = None

    def _shared_width(self, width: int) -> None:
        if self.pooling == "gru" and self.gru is None:
            self.gru = keras.layers.GRU(width, go_backwards=True, name="gru")

    def build(self, input_shape: Any = None) -> None:
        self._build_table()
        width = self._width
        if self.pooling in ("recency", "attention"):
            self.position_logits = self.add_weight(
                shape=(self.max_length,), initializer="zeros", name="position_logits"
            )
        if self.pooling == "attention":
            self.content_logits = self.add_weight(
                shape=(width,), initializer="zeros", name="content_logits"
            )
        if self.age_key is not None and self.pooling in ("recency", "attention"):
            self.age_slope = self.add_weight(shape=(), initializer="zeros", name="age_slope")
        if self.gru is not None:
            self.gru.build((None, self.max_length, width))
        if self.project:
            self.projection = keras.layers.Dense(
                width, use_bias=False, kernel_initializer="identity", name="projection"
            )
            self.projection.build((None, width))
        self.built = True

    def __call__(self, features: Any, *args: Any, **kwargs: Any) -> Any:
        # Before Keras converts the inputs: it fails on a bare array, ragged
        # lists or missing ages with messages that name no feature.
        self.check_feature_ranges(features)
        features = {
            name: _rectangular(value) if name in (self.history_key, self.age_key) else value
            for name, value in features.items()
        }
        return super().__call__(features, *args, **kwargs)

    def _expected(self) -> str:
        ages = "" if self.age_key is None else f", {self.age_key!r}: ages"
        return f"{{{self.history_key!r}: [batch, {self.max_length}] item indices{ages}}}"

    def id_range(self) -> None:
        """None: the tower takes a dict of features (see `two_tower.towers.tower_ids`)."""
        return None

    def check_feature_ranges(self, features: Any, where: str = "features") -> None:
        """Checks the features on the host: a dict with the history (and ages), in range.

        JAX gathers out-of-range ids silently (NaN rows, or negative ids wrapped
        to rows from the end), while TensorFlow and torch raise inside the
        step, each in its own words; this raises the same error on every
        backend first. NumPy-like values (arrays, lists) are
        checked; tensors only for being in a dict.

        Args:
            features: feature name -> array.
            where: how the caller names `features` in the error.

        Raises:
            ValueError: features that are not a dict; a missing history; a
                history that is not `[batch, max_length]` integers (ragged
                rows included), an index at or above the table's rows or below
                -1, or -1 padding before an item of its row. With `age_key`:
                missing ages, ages that are not numbers of the history's
                shape, or ages that are negative, NaN or infinite where the
                history holds an item.
        """
        if not isinstance(features, Mapping):
            received = np.asarray(features) if isinstance(features, (list, tuple)) else features
            shape = getattr(received, "shape", None)
            described = type(features).__name__ + ("" if shape is None else f" of shape {shape}")
            raise ValueError(
                f"HistoryTower takes a dict of features, {self._expected()}. Received a bare "
                f"{described} in {where}: pass {{{self.history_key!r}: history}}."
            )
        if self.history_key not in features:
            raise ValueError(
                f"The history feature {self.history_key!r} is missing from {where}. "
                f"Received features: {sorted(map(str, features))}"
            )
        if self.age_key is not None and self.age_key not in features:
            raise ValueError(
                f"HistoryTower(age_key={self.age_key!r}) reads each item's age, but {where} "
                f"holds no {self.age_key!r}. Received features: {sorted(map(str, features))}. "
                "Pass the ages (InteractionLog.history(..., ages=True)), or build the tower "
                "with age_key=None."
            )
        table = self.item_table
        rows = None if table is None else int(table.input_dim)
        present = check_history(
            features[self.history_key], self.history_key, self.max_length, rows, where
        )
        if present is None:
            return
        if self.age_key is not None:
            self._check_ages(features[self.age_key], present, where)

    def _check_ages(self, ages: Any, present: np.ndarray, where: str) -> None:
        """Ages of the history's shape, finite and >= 0 where an item is present."""
        if not isinstance(ages, (np.ndarray, list, tuple)):
            return
        name = f"Feature {self.age_key!r} in {where}"
        array = _rectangular(ages, name, self.max_length)
        if array.dtype.kind not in "iuf" or array.shape != present.shape:
            raise ValueError(
                f"{name} must hold one age (a number) per history entry, shape "
                f"{present.shape} like {self.history_key!r}. Received shape {array.shape}, "
                f"dtype {array.dtype}"
            )
        values = array.astype("float64")
        bad = present & ~(np.isfinite(values) & (values >= 0))
        if bad.any():
            row, column = (int(i[0]) for i in np.nonzero(bad))
            raise ValueError(
                f"{name} must be finite and >= 0 where the history holds an item: an age is "
                "the request time minus the interaction time (InteractionLog.history(..., "
                f"ages=True)). Received {values[row, column]} at row {row}, column {column}. "
                "A negative age usually means the subtraction was reversed. Padded positions "
                "(-1 in the history) may hold anything."
            )

    def call(self, features: Mapping[str, Any], training: bool = False) -> Tensor:
        if not isinstance(features, Mapping):
            raise ValueError(
                f"HistoryTower takes a dict of features, {self._expected()}. Received "
                f"{type(features).__name__}"
            )
        history = ops.convert_to_tensor(features[self.history_key])
        present = ops.greater_equal(history, 0)
        mask = ops.cast(present, "float32")
        embedded = self._table()(ops.maximum(history, 0))
        if self.pooling == "gru":
            assert self.gru is not None
            pooled = self.gru(embedded, mask=present, training=training)
            pooled = pooled * ops.minimum(ops.sum(mask, axis=1, keepdims=True), 1.0)
        else:
            logits = ops.zeros_like(mask)
            if self.pooling in ("recency", "attention"):
                logits = logits + self.position_logits[None, :]
            if self.pooling == "attention":
                logits = logits + ops.einsum("bld,d->bl", embedded, self.content_logits)
            if self.age_key is not None and self.pooling in ("recency", "attention"):
                # Padded positions may hold anything (NaN too): zeroed before the
                # log, so that no NaN reaches the weights or their gradients.
                ages = ops.cast(features[self.age_key], "float32")
                ages = ops.maximum(ops.where(present, ages, ops.zeros_like(ages)), 0.0)
                logits = logits - self.age_slope * ops.log1p(ages)
            logits = ops.where(present, logits, ops.full_like(logits, -1e9))
            weights = ops.softmax(logits, axis=-1) * mask
            pooled = ops.einsum("bl,bld->bd", weights, embedded)
        if self.projection is not None:
            pooled = self.projection(pooled)
        if self.context is not None:
            pooled = pooled + ops.cast(self.context(features, training=training), pooled.dtype)
        if self.bias == "constant":
            pooled = ops.concatenate([pooled, ops.ones_like(pooled[:, :1])], axis=-1)
        return pooled

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "num_items": self.num_items,
                "embedding_dim": self.embedding_dim,
                "max_length": self.max_length,
                "pooling": self.pooling,
                "history_key": self.history_key,
                "age_key": self.age_key,
                "context": None
                if self.context is None
                else keras.saving.serialize_keras_object(self.context),
                "project": self.project,
                "bias": self.bias,
                "l2": self.l2,
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HistoryTower:
        config = dict(config)
        if config.get("context") is not None:
            config["context"] = keras.saving.deserialize_keras_object(config["context"])
        return cls(**config)


def check_history(
    history: Any, key: str, max_length: int, rows: int | None, where: str
) -> np.ndarray | None:
    """Checks a NumPy-like history (most recent first, -1 after); returns where items are.

    Returns None, checking nothing, for a tensor.
    """
    if not isinstance(history, (np.ndarray, list, tuple)):
        return None
    array = _rectangular(history, f"Feature {key!r} in {where}", max_length)
    if array.ndim != 2 or array.shape[1] != max_length or array.dtype.kind not in "iu":
        raise ValueError(
            f"Feature {key!r} in {where} must be [batch, {max_length}] integer item indices "
            f"(max_length={max_length}), -1 for padding. Received shape {array.shape}, "
            f"dtype {array.dtype}"
        )
    check_item_range(array, key, rows, where)
    present: np.ndarray = array >= 0
    gaps = present[:, 1:] & ~present[:, :-1]
    if gaps.any():
        row = int(np.flatnonzero(gaps.any(axis=1))[0])
        raise ValueError(
            f"Feature {key!r} in {where} must hold each row's items first, the most recent in "
            "column 0, then -1 padding after the last item (as InteractionLog.history "
            f"returns). Row {row} has padding before an item: {array[row].tolist()}. "
            "keras.utils.pad_sequences pads in front unless padding='post'."
        )
    return present


def check_item_range(array: np.ndarray, key: str, rows: int | None, where: str) -> None:
    """Raises unless `array` holds item indices below `rows` (when known) or -1."""
    if array.size and (int(array.min()) < -1 or (rows is not None and array.max() >= rows)):
        allowed = f"[0, {rows})" if rows is not None else "[0, ...)"
        raise ValueError(
            f"Feature {key!r} in {where} must hold item indices in {allowed} or -1 padding. "
            f"Received values from {int(array.min())} to {int(array.max())}."
        )


def _rectangular(value: Any, name: str = "", width: int | None = None) -> Any:
    """Lists and tuples as a NumPy array; ragged rows raise, naming the feature.

    Without `name`, anything else is returned as it is (a tensor, for Keras).
    """
    if not isinstance(value, (list, tuple)):
        return np.asarray(value) if name else value
    try:
        return np.asarray(value)
    except ValueError:
        lengths = sorted({len(row) for row in value if hasattr(row, "__len__")})
        raise ValueError(
            f"{name or 'A HistoryTower feature'} must be a rectangular [batch, "
            f"{width or 'max_length'}] array. Received ragged rows of lengths {lengths}: pad "
            "each row to the same width (InteractionLog.history returns the items, most "
            "recent first, then -1 padding, and with ages=True their ages, 0 where padded)."
        ) from None
