"""A backend-neutral vocabulary: raw ids or strings to contiguous indices."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from two_tower import _arguments

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _values(raw: Any, name: str) -> np.ndarray:
    """Raw values as an int64 or str NumPy array; floats, mixes and overflows raise.

    Args:
        raw: the array-like of values.
        name: the argument `raw` came from, for error messages.

    Returns:
        An int64 or unicode array of the same shape; bytes are decoded as UTF-8.
    """
    # Lists go through object dtype: NumPy would silently turn [1, "a"] into strings.
    values = np.asarray(raw, dtype=object) if isinstance(raw, (list, tuple)) else np.asarray(raw)
    if values.dtype == object:
        flat = values.reshape(-1).tolist()
        if all(isinstance(v, (str, bytes)) for v in flat):
            strings = [v if isinstance(v, str) else _decode(v, name) for v in flat]
            return np.array(strings, dtype=str).reshape(values.shape)
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in flat):
            try:
                return values.astype("int64")
            except OverflowError:
                raise _int64_error([int(v) for v in flat], name) from None
        if all(isinstance(v, float) for v in flat):
            values = values.astype("float64")  # rejected below, naming the dtype
        else:
            kinds = sorted({type(v).__name__ for v in flat})
            raise ValueError(
                f"`{name}` must be all integers or all strings. Received types {kinds}"
            )
    if values.dtype.kind == "u" and values.size and values.max() > _INT64_MAX:
        # A uint64 of 2**63 or more would wrap to a negative int64, maybe a known value.
        raise _int64_error(values.reshape(-1).tolist(), name)
    if values.dtype.kind in "iu":
        return values.astype("int64", copy=False)
    if values.dtype.kind == "U":
        return values
    if values.dtype.kind == "S":
        # `astype(str)` would decode as ASCII; bytes are UTF-8 text (b"\xc3\xa9" is "é").
        try:
            return np.char.decode(values, "utf-8")
        except UnicodeDecodeError:
            for value in values.reshape(-1).tolist():
                _decode(value, name)  # raises, naming the first value that is not UTF-8
            raise
    raise ValueError(f"`{name}` must hold integers or strings. Received dtype {values.dtype}")


def _rectangular(raw: Any, padding: Any, name: str) -> Any:
    """Rows of different lengths padded at the end with `padding`; anything else as it is.

    Rows are the items of a list or tuple, or of a 1D object array, that are
    themselves lists, tuples or arrays (NumPy cannot make one array of them).
    """
    is_rows = isinstance(raw, (list, tuple)) or (
        isinstance(raw, np.ndarray) and raw.dtype == object and raw.ndim == 1
    )
    if not is_rows or not len(raw):
        return raw
    if not all(isinstance(row, (list, tuple, np.ndarray)) for row in raw):
        return raw
    lengths = {len(row) for row in raw}
    if len(lengths) == 1:
        return [list(row) for row in raw]
    if padding is None:
        raise ValueError(
            f"`{name}` has rows of different lengths ({min(lengths)} to {max(lengths)}). Pad "
            "them to one width, or give the vocabulary a `padding` value (e.g. "
            'Vocabulary(padding="")), which pads them and maps the padding to -1.'
        )
    width = max(lengths)
    return [[*row, *[padding] * (width - len(row))] for row in raw]


def _int64_error(integers: list[int], name: str) -> ValueError:
    """The error for `integers`, some of which fall outside int64."""
    outside = [v for v in integers if not _INT64_MIN <= v <= _INT64_MAX]
    return ValueError(
        f"Integer `{name}` must fit in int64 (from -2**63 to 2**63 - 1). Received {outside[:5]}"
    )


def _decode(value: bytes, name: str) -> str:
    """`value` decoded as UTF-8; raises, naming the value, if it is not UTF-8."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(
            f"Bytes in `{name}` must be UTF-8 text. Received {value!r}, which is not valid UTF-8."
        ) from None


@keras.saving.register_keras_serializable(package="two_tower")
class Vocabulary(keras.layers.Layer):
    """Maps raw ids or strings to contiguous int32 indices, on the host.

    Keras' `StringLookup` and `IntegerLookup` run on TensorFlow internally, so
    they cannot sit inside a JAX or torch graph. This lookup runs in NumPy
    before the model (call it on the raw features you pass to `fit` or
    `recommend`), so the same code works on every backend, and the towers only
    ever see indices in `[0, size)`.

    Index layout: `0 .. num_oov_buckets - 1` are out-of-vocabulary buckets, then
    the vocabulary in the order given (or, from `adapt`, by descending count,
    ties by value). A value never seen goes to bucket `crc32(value) %
    num_oov_buckets`, the same in every process and on every backend (Python's
    `hash` is salted per process, so it is not used).

    Padding: the `padding` value (e.g. `""` or `-1`) maps to index -1, which
    `FeatureTower` and `HistoryTower` read as an empty position: it never
    reaches a table row. Pad multi-valued features (genres, histories) with it.
    The empty string is never a known value (`set_vocabulary` refuses it and
    `adapt` skips it). Unless it is the `padding` value, `""` is an unknown value
    like any other and goes to OOV bucket 0, which is a learned row shared with
    the unknown values: so lists padded with `""` need `padding=""`.

    An empty vocabulary (`Vocabulary([])`, or `adapt` keeping no value because
    of `min_count`) is valid: every value, integer or string, goes to its OOV
    bucket, as an unknown value does in any vocabulary. Only a layer with no
    vocabulary at all (`vocabulary=None` and no `adapt` yet) refuses lookups.

    Values: integers must fit in int64 (larger Python ints and uint64 values of
    2**63 or more raise rather than wrap around). Bytes are UTF-8 text, so
    `b"\\xc3\\xa9"` and `"é"` are the same value; bytes that are not UTF-8 raise.
    NumPy's fixed-width strings drop trailing NUL characters, so `"a\\x00"` is
    the same value as `"a"`.

    Args:
        vocabulary: the known values (integers, strings or UTF-8 bytes, unique;
            possibly none), or None to call `adapt` later.
        num_oov_buckets: buckets for unseen values, at least 1.
        max_size: with `adapt`, keep at most this many of the most frequent
            values.
        min_count: with `adapt`, keep values seen at least this many times.
        padding: a value that maps to -1 (padding) instead of an index, or
            None. It must not be a known value; `adapt` does not count it.
        **kwargs: standard `keras.layers.Layer` arguments.

    Raises:
        ValueError: on a bad option, or a bad `vocabulary` (see
            `set_vocabulary`).

    Examples:
        >>> import numpy as np
        >>> vocab = two_tower.Vocabulary(["drama", "comedy"], num_oov_buckets=1)
        >>> vocab(np.array(["comedy", "horror", "drama"])).tolist()
        [2, 0, 1]
        >>> vocab.size
        3
        >>> genres = two_tower.Vocabulary(["drama", "comedy"], padding="")
        >>> genres(np.array([["comedy", ""], ["horror", "drama"]])).tolist()
        [[2, -1], [0, 1]]
    """

    def __init__(
        self,
        vocabulary: Sequence[Any] | np.ndarray | None = None,
        num_oov_buckets: int = 1,
        max_size: int | None = None,
        min_count: int = 1,
        padding: str | int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value, minimum in (
            ("num_oov_buckets", num_oov_buckets, 1),
            ("max_size", max_size, 1),
            ("min_count", min_count, 1),
        ):
            if value is not None:  # NumPy integers accepted, stored as Python ints
                _arguments.integer(name, value, minimum=minimum, owner="Vocabulary")
        self.num_oov_buckets = int(num_oov_buckets)
        self.max_size = None if max_size is None else int(max_size)
        self.min_count = int(min_count)
        if padding is not None:
            if isinstance(padding, (bytes, np.bytes_)):
                padding = _decode(bytes(padding), "padding")
            if isinstance(padding, bool) or not isinstance(padding, (str, int, np.integer)):
                raise ValueError(
                    "`padding` must be a string, an integer or None. Received: "
                    f"padding={padding!r} of type {type(padding).__name__}"
                )
            padding = _values([padding], "padding").tolist()[0]
        self.padding = padding
        # (values, sorted values, their indices), replaced as one so that a lookup
        # running beside `add` reads one vocabulary, old or new.
        self._tables: tuple[Any, Any, Any] = (None, None, None)
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)
        self.built = True

    _vocabulary = property(lambda self: self._tables[0])
    _sorted = property(lambda self: self._tables[1])
    _order = property(lambda self: self._tables[2])

    @property
    def vocabulary(self) -> np.ndarray | None:
        """The known values, in index order (after the OOV buckets)."""
        return self._vocabulary

    @property
    def size(self) -> int:
        """Number of indices: OOV buckets plus known values (the embedding rows)."""
        known = 0 if self._vocabulary is None else len(self._vocabulary)
        return self.num_oov_buckets + known

    def set_vocabulary(self, vocabulary: Sequence[Any] | np.ndarray) -> None:
        """Replaces the known values (unique integers or strings, in index order).

        Args:
            vocabulary: the known values, possibly none (then every value is OOV).

        Raises:
            ValueError: on duplicates, the empty string, floats, a mix of integers
                and strings, integers outside int64, or bytes that are not UTF-8.
        """
        values = _values(vocabulary, "vocabulary").reshape(-1)
        if values.dtype.kind == "U" and np.any(values == ""):
            raise ValueError(
                "`vocabulary` must not contain the empty string: it is padding "
                '(with padding="") or an unknown value (OOV bucket 0), never a known value.'
            )
        if (
            self.padding is not None
            and len(values)
            and (values.dtype.kind == "U") != isinstance(self.padding, str)
        ):
            raise ValueError(
                f"`padding` ({self.padding!r}) must be of the vocabulary's kind: "
                f"{'a string' if values.dtype.kind == 'U' else 'an integer'}."
            )
        if self.padding is not None and len(values) and np.any(values == self.padding):
            raise ValueError(
                f"`vocabulary` must not contain the padding value {self.padding!r}: it "
                "maps to -1, not to an index."
            )
        order = np.argsort(values, kind="stable")
        ordered = values[order]
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if len(repeated):
            raise ValueError(
                f"Vocabulary values must be unique. Received duplicates: "
                f"{np.unique(repeated)[:5].tolist()}"
            )
        self._tables = (values.copy(), ordered, order)

    def add(self, values: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Appends the values not known yet, after the known ones; returns indices.

        Known values keep their indices and unknown values keep their OOV
        bucket, so a model trained before still reads every old index as it
        did. The new values get `size, size + 1, ...` in the order given
        (repeats once). Grow the tables that read the indices to the new
        `size` with `TwoTowerRetrieval.grow_tables` (the model's own
        vocabularies) or the tower's `grow`. `max_size` and `min_count` apply
        to `adapt` only. Costs O(vocabulary) (one merge), not a sort of it.

        Args:
            values: integers or strings (any shape), of the vocabulary's kind.

        Returns:
            The index of each of `values` after the addition, int32, shaped like
            `values`.

        Raises:
            ValueError: before the vocabulary is set; values of the other kind;
                the padding value or the empty string; floats, integers outside
                int64 or bytes that are not UTF-8. Nothing is added then.

        Examples:
            >>> vocab = two_tower.Vocabulary(["drama", "comedy"])
            >>> vocab.add(["horror", "drama", "horror"]).tolist()
            [3, 1, 3]
            >>> vocab.size, vocab(["comedy", "western"]).tolist()
            (4, [2, 0])
        """
        if self._sorted is None or self._order is None or self._vocabulary is None:
            raise ValueError(
                "The vocabulary is not set: call `adapt(data)` or pass `vocabulary` first, "
                "then `add` values to it."
            )
        array = _values(values, "values")
        flat = array.reshape(-1)
        known = self._vocabulary
        if known.size and flat.size and (flat.dtype.kind == "U") != (known.dtype.kind == "U"):
            raise ValueError(
                f"`values` of dtype {flat.dtype} cannot be added to a vocabulary of dtype "
                f"{known.dtype}."
            )
        if flat.dtype.kind == "U" and np.any(flat == ""):
            raise ValueError(
                "`values` must not contain the empty string: it is padding or an unknown "
                "value, never a known value."
            )
        if (
            self.padding is not None
            and flat.size
            and (flat.dtype.kind == "U") == isinstance(self.padding, str)
            and np.any(flat == self.padding)
        ):
            raise ValueError(
                f"`values` must not contain the padding value {self.padding!r}: it maps to "
                "-1, not to an index."
            )
        if (
            self.padding is not None
            and flat.size
            and not known.size
            and (flat.dtype.kind == "U") != isinstance(self.padding, str)
        ):
            raise ValueError(
                f"`padding` ({self.padding!r}) must be of the vocabulary's kind: "
                f"{'a string' if flat.dtype.kind == 'U' else 'an integer'}."
            )
        if known.size:
            slots = np.minimum(np.searchsorted(self._sorted, flat), len(self._sorted) - 1)
            new = flat[self._sorted[slots] != flat]
        else:
            new = flat
        unique, first = np.unique(new, return_index=True)
        fresh = new[np.sort(first)]  # first-seen order
        if fresh.size:
            # Strings may be longer than the known ones: widen, never truncate.
            dtype = np.promote_types(known.dtype, fresh.dtype) if known.size else fresh.dtype
            fresh_indices = np.empty(len(fresh), dtype="int64")  # by sorted value
            fresh_indices[np.searchsorted(unique, fresh)] = np.arange(
                len(known), len(known) + len(fresh)
            )
            # Merge the sorted new values into the sorted known ones: O(n), no re-sort.
            at = np.searchsorted(self._sorted, unique)
            self._tables = (
                np.concatenate([known.astype(dtype), fresh.astype(dtype)]),
                np.insert(self._sorted.astype(dtype), at, unique.astype(dtype)),
                np.insert(self._order, at, fresh_indices),
            )
        return self.lookup(array, "values")

    def adapt(self, data: Any) -> None:
        """Builds the vocabulary from data: the most frequent values first.

        Args:
            data: an array-like of raw values (any shape; all are counted).
                Empty strings and the `padding` value are never kept. If no value
                is seen `min_count` times, the vocabulary is empty and every value maps to its OOV
                bucket.

        Raises:
            ValueError: on floats, a mix of integers and strings, integers
                outside int64, bytes that are not UTF-8, or no values at all.
        """
        values = _values(data, "data").reshape(-1)
        if values.dtype.kind == "U":
            values = values[values != ""]
        if self.padding is not None and len(values):
            same_kind = (values.dtype.kind == "U") == isinstance(self.padding, str)
            if same_kind:
                values = values[values != self.padding]
        if not len(values):
            raise ValueError(
                "`data` holds no values to adapt to (empty, or only empty strings and the "
                f"`padding` value). Received {np.size(data)} value(s). Pass the column's values."
            )
        unique, counts = np.unique(values, return_counts=True)
        keep = counts >= self.min_count
        unique, counts = unique[keep], counts[keep]
        order = np.lexsort((unique, -counts))  # by count, ties by value
        if self.max_size is not None:
            order = order[: self.max_size]
        self.set_vocabulary(unique[order])

    def __call__(self, inputs: Any) -> np.ndarray:
        # Straight to `call`: Keras' `Layer.__call__` would convert string arrays
        # to backend tensors, which JAX and torch cannot hold.
        return self.call(inputs)

    def call(self, inputs: Any) -> np.ndarray:
        """Indices of `inputs` (any shape), as a NumPy int32 array.

        Known values get their index, unknown values their OOV bucket, and
        the `padding` value -1. Rows of different lengths (a list of lists, or
        an object array of arrays, e.g. each movie's genres) are padded at the
        end to the longest with the `padding` value, so they map to -1.

        Raises:
            ValueError: before `adapt` or `set_vocabulary`, when the values are
                of another kind (integer vs string) than a non-empty vocabulary,
                on rows of different lengths without a `padding` value, or on
                floats, integers outside int64 or bytes that are not UTF-8.
        """
        return self.lookup(inputs)

    def lookup(self, inputs: Any, name: str = "inputs") -> np.ndarray:
        """`call`, with errors naming the values `name` (e.g. the caller's argument)."""
        vocabulary, sorted_values, order = self._tables  # one read: see `add`
        if vocabulary is None:
            raise ValueError(
                "The vocabulary is not set: call `adapt(data)` or pass `vocabulary` first."
            )
        values = _values(_rectangular(inputs, self.padding, name), name)
        known = len(sorted_values)
        # An empty vocabulary has no kind to mismatch: everything is simply unknown.
        if (
            known
            and values.size
            and (values.dtype.kind == "U") != (sorted_values.dtype.kind == "U")
        ):
            raise ValueError(
                f"`{name}` of dtype {values.dtype} cannot be looked up in a vocabulary of "
                f"dtype {vocabulary.dtype}."
            )
        flat = values.reshape(-1)
        if known:
            slots = np.minimum(np.searchsorted(sorted_values, flat), known - 1)
            found = sorted_values[slots] == flat
            indices = np.where(found, order[slots] + self.num_oov_buckets, 0)
        else:
            found = np.zeros(flat.shape, dtype=bool)
            indices = np.zeros(flat.shape, dtype="int64")
        padded = np.zeros(flat.shape, dtype=bool)
        if (
            self.padding is not None
            and flat.size
            and (flat.dtype.kind == "U") == isinstance(self.padding, str)
        ):
            padded = flat == self.padding
        unseen = np.flatnonzero(~found & ~padded)
        if len(unseen) and self.num_oov_buckets > 1:
            indices[unseen] = [self._bucket(v) for v in flat[unseen].tolist()]
        indices[padded] = -1
        return indices.astype("int32").reshape(values.shape)

    def values_of(self, indices: Any) -> np.ndarray:
        """The known values at `indices` (the inverse of a lookup of known values).

        Args:
            indices: integer indices of known values, in
                `[num_oov_buckets, size)`, any shape.

        Returns:
            The values, an int64 or unicode array of the shape of `indices`.

        Raises:
            ValueError: before the vocabulary is set, or on an index that is an
                OOV bucket, padding, or out of range (they name no one value).
        """
        if self._vocabulary is None:
            raise ValueError(
                "The vocabulary is not set: call `adapt(data)` or pass `vocabulary` first."
            )
        positions = np.asarray(indices)
        if positions.dtype.kind not in "iu":
            raise ValueError(f"`indices` must be integers. Received dtype {positions.dtype}")
        bad = (positions < self.num_oov_buckets) | (positions >= self.size)
        if np.any(bad):
            raise ValueError(
                f"`indices` must name known values, in [{self.num_oov_buckets}, {self.size}) "
                f"(below are the OOV buckets). Received {np.unique(positions[bad])[:5].tolist()}"
            )
        return self._vocabulary[positions - self.num_oov_buckets]

    def _bucket(self, value: Any) -> int:
        if value == "":
            return 0
        if isinstance(value, str):
            data = value.encode("utf-8")
        else:
            data = int(value).to_bytes(8, "little", signed=True)
        return zlib.crc32(data) % self.num_oov_buckets

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "vocabulary": None if self._vocabulary is None else self._vocabulary.tolist(),
                "num_oov_buckets": self.num_oov_buckets,
                "max_size": self.max_size,
                "min_count": self.min_count,
                "padding": self.padding,
            }
        )
        return config
