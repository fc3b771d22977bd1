"""A causal self-attention query tower over the user's item sequence (SASRec-style)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
from keras import ops

from two_tower import _arguments
from two_tower.towers._item_table import SharedItemTable
from two_tower.towers.history_tower import (
    BIASES,
    _rectangular,
    check_history,
    check_item_range,
)
from two_tower.types import Tensor

POSITIONS = ("from_oldest", "from_newest")


@keras.saving.register_keras_serializable(package="two_tower")
class SequenceTower(SharedItemTable, keras.layers.Layer):
    """Embeds a query from the user's past items with causal self-attention.

    The architecture of SASRec (Kang & McAuley, ICDM 2018, "Self-attentive
    sequential recommendation"): item embeddings scaled by `sqrt(dim)` plus a
    learned embedding of each item's position, dropout,
    then `num_blocks` blocks of layer norm, causal multi-head attention
    (`keras.layers.MultiHeadAttention`) and a position-wise feed-forward
    network with residual connections, and a final layer norm. Each position
    sees itself and the items before it, never a later one.

    It takes two kinds of input, told apart by their keys:

    - **Serving**: `{history_key: [batch, max_length]}` item indices, the most
      recent first and padded with -1 after the last item (what
      `two_tower.InteractionLog.history` returns, as for `HistoryTower`).
      Returns the `[batch, dim]` output at the most recent item. An empty
      history embeds to the final layer norm's learned offset.
    - **Every position** (training): `{sequence_key: [rows, max_length],
      segment_key: [rows, max_length]}`, several users' sequences packed into
      each row, oldest first, each a run of one segment number (1, 2, ... within
      the row; 0 and item -1 where the row is padded). Attention stays within a
      segment, and positions count within each segment, so a packed row gives
      the same outputs as its segments one per row.
      `two_tower.datasets.SequenceDataset` builds these rows. Returns
      `[rows, max_length, dim]`: position t's output predicts the segment's
      item t + 1. `TwoTowerRetrieval` trains every position at once from it.

    **The item table.** As `HistoryTower`: with `num_items=None` the tower
    shares the candidate tower's id table, so the input items and the scored
    candidates share rows (SASRec's tied embeddings); with `num_items` it owns a
    table.

    Args:
        num_items: rows of the tower's own item table; None shares the
            candidate tower's table (set by `TwoTowerRetrieval`).
        embedding_dim: width of the own item table; with a shared table, None
            or the shared table's width. Must divide by `num_heads`.
        max_length: columns of the input, and the number of position
            embeddings.
        num_blocks: self-attention blocks.
        num_heads: attention heads per block.
        dropout: dropout rate on the embeddings, the attention weights and the
            feed-forward layers, in `[0, 1)`.
        history_key: the serving feature (most recent first).
        sequence_key: the packed, oldest-first feature of training rows.
        segment_key: the segment numbers of `sequence_key`.
        positions: `"from_oldest"` numbers each item from the oldest one in
            the input (0), so position t's output in a training row equals the
            serving output of the history up to t: training sees exactly what
            serving will. `"from_newest"` numbers from the most recent item, as
            SASRec's left-padded input does: the serving input's newest item
            is always position 0, while in training only a segment's last
            output sees its newest item there.
        bias: None, or `"constant"` to append a column of ones, to meet a
            candidate tower's learned bias column
            (`IdEmbeddingTower(bias="learned")`).
        **kwargs: standard `keras.layers.Layer` arguments.

    Raises:
        ValueError: an option out of range (`num_items`, `embedding_dim`,
            `max_length`, `num_blocks`, `num_heads`, `dropout`, `bias`, keys),
            a width that `num_heads` does not divide, or, when sharing the
            candidate table, a candidate tower without one table of ids or of
            another width.

    Call arguments:
        - `features`: a dict, `{history_key: ...}` or `{sequence_key: ...,
          segment_key: ...}` as above. NumPy arrays and rectangular lists are
          checked on the host (`check_feature_ranges`), the same on every
          backend.
        - `training`: applies dropout.

    Call returns:
        `[batch, dim]` (serving) or `[rows, max_length, dim]` (every
        position); one more column with `bias="constant"`.

    Examples:
        >>> import numpy as np
        >>> tower = two_tower.SequenceTower(num_items=10, embedding_dim=8, max_length=4)
        >>> history = np.array([[3, 1, -1, -1], [-1, -1, -1, -1]])
        >>> tuple(tower({"history": history}).shape)
        (2, 8)
        >>> rows = {"sequence": np.array([[1, 3, 5, 2]]), "segment": np.array([[1, 1, 2, 2]])}
        >>> tuple(tower(rows).shape)
        (1, 4, 8)
    """

    def __init__(
        self,
        num_items: int | None = None,
        embedding_dim: int | None = None,
        max_length: int = 50,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.2,
        history_key: str = "history",
        sequence_key: str = "sequence",
        segment_key: str = "segment",
        positions: str = "from_oldest",
        bias: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = "SequenceTower"
        num_items, embedding_dim = self._table_arguments(num_items, embedding_dim, owner)
        max_length = _arguments.integer("max_length", max_length, owner=owner)
        num_blocks = _arguments.integer("num_blocks", num_blocks, owner=owner)
        num_heads = _arguments.integer("num_heads", num_heads, owner=owner)
        dropout = _arguments.number("dropout", dropout, minimum=0.0, owner=owner)
        if dropout >= 1.0:
            raise ValueError(
                f"SequenceTower: `dropout` must be a rate in [0, 1). Received: dropout={dropout}"
            )
        positions = _arguments.choice("positions", positions, POSITIONS, owner=owner)
        if bias not in BIASES:
            raise ValueError(
                f"SequenceTower: `bias` must be None or 'constant'. Received: bias={bias!r} "
                f"({type(bias).__name__})"
            )
        keys = {"history_key": history_key, "sequence_key": sequence_key}
        keys["segment_key"] = segment_key
        for name, key in keys.items():
            if not (isinstance(key, str) and key):
                raise ValueError(
                    f"SequenceTower: `{name}` must be a non-empty string. Received: {key!r}"
                )
        if len(set(keys.values())) < len(keys):
            raise ValueError(
                "SequenceTower: `history_key`, `sequence_key` and `segment_key` must differ. "
                f"Received: {keys}"
            )
        if embedding_dim is not None and embedding_dim % num_heads:
            raise ValueError(
                f"SequenceTower: `embedding_dim` (={embedding_dim}) must divide by "
                f"`num_heads` (={num_heads})."
            )
        self.num_items = num_items
        self.embedding_dim = embedding_dim
        self.max_length = max_length
        self.num_blocks = num_blocks
        self.num_heads = num_heads
        self.dropout = dropout
        self.history_key = history_key
        self.sequence_key = sequence_key
        self.segment_key = segment_key
        self.positions_from = positions
        self.bias = bias
        self.own_table = (
            keras.layers.Embedding(num_items, embedding_dim, name="item_embedding")
            if num_items is not None and embedding_dim is not None
            else None
        )
        self._init_shared_table()
        self.positions: keras.layers.Embedding | None = None
        self.input_dropout = keras.layers.Dropout(dropout)
        self.attention_norms: list[keras.layers.Layer] = []
        self.attentions: list[keras.layers.Layer] = []
        self.feed_forward_norms: list[keras.layers.Layer] = []
        self.feed_forward_inner: list[keras.layers.Layer] = []
        self.feed_forward_outer: list[keras.layers.Layer] = []
        self.feed_forward_dropout = keras.layers.Dropout(dropout)
        self.output_norm = keras.layers.LayerNormalization(epsilon=1e-8, name="output_norm")
        if embedding_dim is not None:
            self._make_blocks(embedding_dim)

    def _shared_width(self, width: int) -> None:
        if width % self.num_heads:
            raise ValueError(
                f"SequenceTower: the shared candidate table's width (={width}) must divide "
                f"by `num_heads` (={self.num_heads})."
            )
        if not self.attentions:
            self._make_blocks(width)

    def _make_blocks(self, width: int) -> None:
        """The position table and the blocks, once the width is known."""
        self.positions = keras.layers.Embedding(self.max_length, width, name="position_embedding")
        for block in range(self.num_blocks):
            self.attention_norms.append(
                keras.layers.LayerNormalization(epsilon=1e-8, name=f"attention_norm_{block}")
            )
            self.attentions.append(
                keras.layers.MultiHeadAttention(
                    self.num_heads,
                    width // self.num_heads,
                    dropout=self.dropout,
                    name=f"attention_{block}",
                )
            )
            self.feed_forward_norms.append(
                keras.layers.LayerNormalization(epsilon=1e-8, name=f"feed_forward_norm_{block}")
            )
            self.feed_forward_inner.append(
                keras.layers.Dense(width, activation="relu", name=f"feed_forward_inner_{block}")
            )
            self.feed_forward_outer.append(
                keras.layers.Dense(width, name=f"feed_forward_outer_{block}")
            )

    def build(self, input_shape: Any = None) -> None:
        self._build_table()
        width = self._width
        if not self.attentions:
            self._make_blocks(width)
        sequence = (None, self.max_length, width)
        assert self.positions is not None
        self.positions.build((None, self.max_length))
        for block in range(self.num_blocks):
            self.attention_norms[block].build(sequence)
            self.attentions[block].build(sequence, sequence)
            self.feed_forward_norms[block].build(sequence)
            self.feed_forward_inner[block].build(sequence)
            self.feed_forward_outer[block].build(sequence)
        self.output_norm.build(sequence)
        self.built = True

    # ------------------------------------------------------------------ inputs
    def predicts_every_position(self, features: Any) -> bool:
        """Whether `features` are packed training rows (`sequence_key` present)."""
        return isinstance(features, Mapping) and self.sequence_key in features

    def serving_example(self) -> dict[str, np.ndarray]:
        """One serving input, `{history_key: [1, max_length]}` all padding.

        `TwoTowerRetrieval` records its shape as the query input of a model
        trained on packed rows: what a saved model is rebuilt with and what
        `export` serves.
        """
        return {self.history_key: np.full((1, self.max_length), -1, "int32")}

    def __call__(self, features: Any, *args: Any, **kwargs: Any) -> Any:
        # Before Keras converts the inputs: it fails on a bare array or ragged
        # lists with messages that name no feature.
        self.check_feature_ranges(features)
        keys = (self.history_key, self.sequence_key, self.segment_key)
        features = {
            name: _rectangular(value) if name in keys else value for name, value in features.items()
        }
        return super().__call__(features, *args, **kwargs)

    def id_range(self) -> None:
        """None: the tower takes a dict of features (see `two_tower.towers.tower_ids`)."""
        return None

    def _expected(self) -> str:
        return (
            f"{{{self.history_key!r}: [batch, {self.max_length}] item indices}} or "
            f"{{{self.sequence_key!r}: ..., {self.segment_key!r}: ...}} packed training rows"
        )

    def check_feature_ranges(self, features: Any, where: str = "features") -> None:
        """Checks the features on the host: a dict of in-range, well-formed items.

        JAX gathers out-of-range ids silently while TensorFlow and torch raise
        inside the step; this raises the same error on every backend first.
        NumPy-like values are checked; tensors only for being in a dict.

        Args:
            features: feature name -> array.
            where: how the caller names `features` in the error.

        Raises:
            ValueError: features that are not a dict or hold neither input; a
                history as `HistoryTower` checks it; packed rows whose
                `sequence_key` and `segment_key` differ in shape or are not
                `[rows, max_length]` integers, items out of range, item -1
                where the segment is not 0 (or the reverse), negative segment
                numbers, or a segment number in two runs of one row.
        """
        if not isinstance(features, Mapping):
            received = np.asarray(features) if isinstance(features, (list, tuple)) else features
            shape = getattr(received, "shape", None)
            described = type(features).__name__ + ("" if shape is None else f" of shape {shape}")
            raise ValueError(
                f"SequenceTower takes a dict of features, {self._expected()}. Received a bare "
                f"{described} in {where}."
            )
        table = self.item_table
        rows = None if table is None else int(table.input_dim)
        if not self.predicts_every_position(features):
            if self.history_key not in features:
                raise ValueError(
                    f"SequenceTower takes {self._expected()}. Neither {self.history_key!r} nor "
                    f"{self.sequence_key!r} is in {where}. Received features: "
                    f"{sorted(map(str, features))}"
                )
            check_history(
                features[self.history_key], self.history_key, self.max_length, rows, where
            )
            return
        if self.segment_key not in features:
            raise ValueError(
                f"Packed training rows in {where} hold {self.sequence_key!r} but no "
                f"{self.segment_key!r} (each item's segment number). Received features: "
                f"{sorted(map(str, features))}. two_tower.datasets.SequenceDataset builds both."
            )
        items, segments = features[self.sequence_key], features[self.segment_key]
        if not isinstance(items, (np.ndarray, list, tuple)) or not isinstance(
            segments, (np.ndarray, list, tuple)
        ):
            return
        width = self.max_length
        items = _rectangular(items, f"Feature {self.sequence_key!r} in {where}", width)
        segments = _rectangular(segments, f"Feature {self.segment_key!r} in {where}", width)
        for name, array in ((self.sequence_key, items), (self.segment_key, segments)):
            if array.ndim != 2 or array.shape[1] != width or array.dtype.kind not in "iu":
                raise ValueError(
                    f"Feature {name!r} in {where} must be [rows, {width}] integers "
                    f"(max_length={width}). Received shape {array.shape}, dtype {array.dtype}"
                )
        if items.shape != segments.shape:
            raise ValueError(
                f"Features {self.sequence_key!r} and {self.segment_key!r} in {where} must have "
                f"the same shape. Received {items.shape} and {segments.shape}"
            )
        check_item_range(items, self.sequence_key, rows, where)
        if segments.size and int(segments.min()) < 0:
            raise ValueError(
                f"Feature {self.segment_key!r} in {where} must hold segment numbers >= 1, or 0 "
                f"where the row is padded. Received {int(segments.min())}"
            )
        mismatch = (items < 0) != (segments == 0)
        if mismatch.any():
            row = int(np.flatnonzero(mismatch.any(axis=1))[0])
            raise ValueError(
                f"In {where}, padding must be item -1 with segment 0, and only there. Row {row} "
                f"has items {items[row].tolist()} and segments {segments[row].tolist()}"
            )
        starts = segments[:, 1:] != segments[:, :-1]
        runs = np.concatenate([segments[:, :1] > 0, starts & (segments[:, 1:] > 0)], axis=1)
        for index in np.flatnonzero(runs.sum(axis=1) > 1):
            numbers = segments[index][runs[index]]
            if len(np.unique(numbers)) < len(numbers):
                raise ValueError(
                    f"In {where}, each segment must be one run of its row: row {int(index)} "
                    f"has segments {segments[index].tolist()}"
                )

    # -------------------------------------------------------------------- call
    def call(self, features: Mapping[str, Any], training: bool = False) -> Tensor:
        if not isinstance(features, Mapping):
            raise ValueError(
                f"SequenceTower takes a dict of features, {self._expected()}. Received "
                f"{type(features).__name__}"
            )
        if self.predicts_every_position(features):
            items = ops.convert_to_tensor(features[self.sequence_key])
            segments = ops.convert_to_tensor(features[self.segment_key])
            outputs = self._encode(items, segments, training)
        else:
            # Most recent first, -1 after: reversed, one segment per row, left-padded.
            items = ops.flip(ops.convert_to_tensor(features[self.history_key]), axis=1)
            segments = ops.cast(ops.greater_equal(items, 0), "int32")
            outputs = self._encode(items, segments, training)[:, -1, :]
        if self.bias == "constant":
            outputs = ops.concatenate([outputs, ops.ones_like(outputs[..., :1])], axis=-1)
        return outputs

    def _encode(self, items: Tensor, segments: Tensor, training: bool) -> Tensor:
        """`[rows, length, dim]` outputs of packed rows (see the class docstring)."""
        columns = items.shape[1]
        if columns is not None and columns > self.max_length:
            # (JAX would gather position embeddings out of range as NaN.)
            raise ValueError(
                f"SequenceTower(max_length={self.max_length}) takes at most {self.max_length} "
                f"columns: it has that many position embeddings. Received {columns} columns."
            )
        segments = ops.cast(segments, "int32")
        present = ops.greater(segments, 0)
        same = ops.equal(segments[:, :, None], segments[:, None, :])
        column = ops.arange(ops.shape(segments)[1], dtype="int32")
        earlier = ops.greater_equal(column[:, None], column[None, :])  # key j <= query i
        # "from_oldest": how many earlier items share the segment; "from_newest":
        # how many later ones do.
        before = earlier if self.positions_from == "from_oldest" else ops.logical_not(earlier)
        positions = ops.sum(ops.cast(ops.logical_and(same, before), "int32"), axis=2)
        if self.positions_from == "from_oldest":
            positions = ops.maximum(positions - 1, 0)
        attend = ops.logical_and(ops.logical_and(same, earlier[None]), present[:, None, :])
        mask = ops.cast(present, "float32")[..., None]
        table = self._table()
        width = self._width
        assert self.positions is not None
        hidden = table(ops.maximum(items, 0)) * math.sqrt(width) + self.positions(positions)
        hidden = self.input_dropout(hidden, training=training) * mask
        for block in range(self.num_blocks):
            queries = self.attention_norms[block](hidden)
            attended = self.attentions[block](
                queries, hidden, attention_mask=attend, training=training
            )
            hidden = self.feed_forward_norms[block](queries + attended)
            inner = self.feed_forward_dropout(
                self.feed_forward_inner[block](hidden), training=training
            )
            outer = self.feed_forward_dropout(
                self.feed_forward_outer[block](inner), training=training
            )
            hidden = (hidden + outer) * mask
        return self.output_norm(hidden)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "num_items": self.num_items,
                "embedding_dim": self.embedding_dim,
                "max_length": self.max_length,
                "num_blocks": self.num_blocks,
                "num_heads": self.num_heads,
                "dropout": self.dropout,
                "history_key": self.history_key,
                "sequence_key": self.sequence_key,
                "segment_key": self.segment_key,
                "positions": self.positions_from,
                "bias": self.bias,
            }
        )
        return config
