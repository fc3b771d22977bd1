"""Training batches streamed from `.npy` shards on disk, for `fit` on every backend."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np

from two_tower import _arguments
from two_tower.datasets import _shard_log
from two_tower.datasets._shard_log import MANIFEST
from two_tower.saving._files import sha256 as _sha256
from two_tower.types import SAMPLING_PROBABILITY

# The key of the label column in `_columns`' dicts, split off as `y` for `fit`.
LABEL = "__label__"


class ShardDataset(keras.utils.PyDataset):
    """Batches of a sharded interaction log, read from disk as `fit` asks for them.

    The log is a folder with a `manifest.json` and one sub-folder of `.npy`
    columns per shard, as `two_tower.datasets.synthetic.write_shards` writes it.
    Columns are memory-mapped: only the rows of the current batch are read, so
    memory stays O(batch + shard size), never O(log).

    Each epoch visits every row once. With `shuffle`, the shard order and the
    order of rows inside each shard are permuted, seeded by `(seed, epoch)`: a
    shuffle buffer as large as a shard. Without it, rows come in log order, so
    the batches are those of `fit` on the concatenated arrays with
    `shuffle=False` (and training gives the same weights).
    `TwoTowerRetrieval.fit` takes `shuffle=False` for a `ShardDataset` (Keras'
    default `shuffle=True` would also permute the order of a `PyDataset`'s
    batches, with Keras' own random state); with a plain `keras.Model`, pass it.

    The epoch advances when batch 0 is asked for after the last batch of the
    current epoch was served (or on `on_epoch_end` after it), so each full pass
    is one epoch on every backend and across `fit` calls, however often Keras
    calls `on_epoch_end` (once more per `fit` on JAX and torch than on
    TensorFlow).

    Keras' `PyDataset` is used, rather than Grain or `tf.data`, because `fit`
    takes it on all three backends with nothing more installed; its `workers`
    prefetch batches in threads. On TensorFlow, `TwoTowerRetrieval.fit` reads
    it through `tf.data`, one Python call per shard rather than per batch
    (see `two_tower.backends.tensorflow.shard_stream`), with the same batches.

    Before anything is read for training, the log is checked as a whole, so
    that a damaged log raises naming the damaged member instead of training on
    what is left. Always (a stat and a header read per file: milliseconds for
    10^8 rows): the manifest's format, its total against the sum of its shard
    row counts, the shards' names in order (`shard-00000`, `shard-00001`, ...),
    that no unlisted `shard-*` folder lies beside the listed ones (the trace of
    a lost entry), and that every column file of every shard exists, holds
    exactly its shard's rows of its dtype and has the size the manifest
    records. With `verify=True` (the default), also the sha256 of every
    streamed column. Then one pass over each id column checks the ids.

    Ids are checked on the host, once when the dataset is made (one pass over
    each shard) and again batch by batch: a value outside
    `[0, id_limits[column])` raises the same `ValueError` on every backend,
    naming the shard and the row (JAX would gather it silently, as a NaN or a
    wrapped row).

    Args:
        folder: the log's folder.
        batch_size: rows per batch (the last batch may be shorter); a Python
            or NumPy integer >= 1.
        columns: model input name -> column, e.g. `{"query": "user",
            "candidate": "item"}` (the default).
        shuffle: permute shards and rows each epoch (True or False).
        seed: the shuffle's seed, an integer >= 0; None draws one (kept in
            `seed`, so every epoch of this dataset follows from it).
        id_limits: streamed column -> number of ids; defaults to the
            generator's `num_users` / `num_items` for `user` / `item` when the
            manifest has them. A column that is not streamed is refused (the
            limit would check nothing).
        verify: also check the sha256 of every streamed column against the
            manifest. This reads those columns once more when the dataset is
            made: 8 bytes a row for `user` and `item` (0.8 GB at 10^8 rows)
            hashed on one core, plus the disk read (its cost beside an epoch:
            "Integrity checks" on the benchmarks page). With False, a column
            changed without changing its size goes unseen.
        sampling_probability: a column (e.g. `"item"`) whose frequency in the
            log is added to each batch as `x["candidate_sampling_probability"]`,
            for `TwoTowerRetrieval`'s logQ correction. The column needs an id
            limit (from the generator or `id_limits`). The counts take one pass
            over the shards when the dataset is made, and O(ids) memory.
        label: a column (e.g. a rating) given to `fit` as `y`: batches become
            `(x, y)`, for `loss="mse"`.
        **kwargs: `keras.utils.PyDataset` arguments (`workers`,
            `use_multiprocessing`, `max_queue_size`).

    Raises:
        FileNotFoundError: without a manifest, or with a missing shard folder
            or file.
        ValueError: a manifest that is not valid or does not add up (a lost or
            reordered shard entry, an edited row count, an unknown format), an
            unlisted shard folder beside the listed ones; a corrupt, truncated,
            emptied or resized file, a checksum mismatch, a missing column, a
            column of the wrong dtype or length, an id out of range; or a bad
            argument. Each names the file or the argument.

    Examples:
        >>> import tempfile, os
        >>> from two_tower.datasets import synthetic
        >>> folder = os.path.join(tempfile.mkdtemp(), "log")
        >>> log = synthetic.SyntheticLog(num_users=20, num_items=30, num_clusters=3)
        >>> _ = synthetic.write_shards(log, folder, 100, shard_size=40)
        >>> data = two_tower.datasets.ShardDataset(folder, batch_size=32)
        >>> len(data), sorted(data[0])
        (4, ['candidate', 'query'])
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        batch_size: int = 1024,
        columns: Mapping[str, str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        id_limits: Mapping[str, int] | None = None,
        verify: bool = True,
        sampling_probability: str | None = None,
        label: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = "ShardDataset"
        self.folder = Path(folder)
        self.batch_size = _arguments.integer("batch_size", batch_size, owner=owner)
        self.columns = _column_map(columns)
        self.label = _optional_name("label", label)
        self.shuffle = _arguments.boolean("shuffle", shuffle, owner=owner)
        given = _arguments.seed("seed", seed, owner=owner)
        # A drawn seed is kept: every epoch of this dataset permutes from it.
        self.seed = int(np.random.default_rng().integers(2**63)) if given is None else given
        verify = _arguments.boolean("verify", verify, owner=owner)
        self.sampling_probability = _optional_name("sampling_probability", sampling_probability)
        # What `_columns` reads: model input name (or LABEL) -> column.
        self._reads = {**self.columns, **({LABEL: self.label} if self.label else {})}
        stored = list(dict.fromkeys(self._reads.values()))
        self.epoch = 0
        self._epoch_finished = False  # the current epoch's last batch was served
        manifest = _shard_log.read_manifest(self.folder)
        shards = manifest["shards"]
        dtypes = dict(manifest["columns"])
        missing = sorted(set(stored) - set(dtypes))
        if missing:
            raise ValueError(
                f"The log in {self.folder} has no column(s) {missing}; it has {sorted(dtypes)}."
            )
        self._column_names = {column: name for name, column in self.columns.items()}
        if (
            self.sampling_probability is not None
            and self.sampling_probability not in self._column_names
        ):
            raise ValueError(
                f"`sampling_probability` must name one of the streamed columns "
                f"{sorted(self.columns.values())}. Received {self.sampling_probability!r}"
            )
        self.id_limits = self._limits(manifest, id_limits)
        if self.sampling_probability is not None and self.sampling_probability not in (
            self.id_limits
        ):
            raise ValueError(
                f"`sampling_probability={self.sampling_probability!r}` needs that column's "
                "number of ids, to count each id's share of the log: pass "
                f"id_limits={{{self.sampling_probability!r}: <number of ids>}}."
            )
        _shard_log.check_shard_folders(self.folder, manifest)
        counts = np.zeros(self.id_limits.get(self.sampling_probability or "", 0), dtype="int64")
        self._paths: list[dict[str, Path]] = []
        self._names: list[str] = []
        # Every member first, cheaply (headers and sizes), then the reading passes.
        for shard in shards:
            self._paths.append({})
            self._names.append(str(self.folder / shard["name"]))
            for column, dtype in dtypes.items():
                path = self.folder / shard["name"] / f"{column}.npy"
                size = (shard.get("bytes") or {}).get(column)
                array = _open(path, dtype, shard["rows"], size)
                if column in self.id_limits and array.dtype.kind not in "iu":
                    raise ValueError(
                        f"Shard file {path} holds {array.dtype} values, but column "
                        f"{column!r} holds ids, which must be integers."
                    )
                if column in stored:
                    self._paths[-1][column] = path
        for index, shard in enumerate(shards):
            for column, path in self._paths[index].items():
                if verify and _sha256(path) != shard["sha256"][column]:
                    raise ValueError(
                        f"Shard file {path} does not match its sha256 in {MANIFEST}: it was "
                        "changed or damaged after the log was written. Rewrite the log."
                    )
                array = _open(path)
                # Once, here, so the error is a ValueError on every backend (inside
                # `fit`, TensorFlow would wrap it in an InvalidArgumentError).
                self._check_ids(array, column, index, None)
                if column == self.sampling_probability:  # logQ counts, in the same pass
                    counts += np.bincount(array, minlength=counts.shape[0])
        self._rows = np.array([int(shard["rows"]) for shard in shards])
        # Share of the log's rows holding each id of the `sampling_probability` column.
        self._frequency = None if self.sampling_probability is None else counts / counts.sum()
        self._plan = self._epoch_plan()

    def _limits(
        self, manifest: dict[str, Any], id_limits: Mapping[str, int] | None
    ) -> dict[str, int]:
        """Column -> number of ids: the generator's, then `id_limits`, for streamed columns."""
        streamed = set(self.columns.values())
        generator = manifest.get("generator")
        generator = generator if isinstance(generator, dict) else {}
        limits = {}
        for column, key in (("user", "num_users"), ("item", "num_items")):
            if column in streamed and _shard_log._is_count(generator.get(key)):
                limits[column] = int(generator[key])
        if id_limits is None:
            return limits
        if not isinstance(id_limits, Mapping):
            raise ValueError(
                "`id_limits` must be a dict of column -> number of ids, e.g. "
                f"{{'item': 1000}}. Received: {id_limits!r} ({type(id_limits).__name__})"
            )
        for column, limit in id_limits.items():
            if column not in streamed:
                raise ValueError(
                    f"`id_limits` names column {column!r}, which is not streamed: the "
                    f"streamed columns are {sorted(streamed)} (`columns`). A limit on "
                    "another column would check nothing."
                )
            limits[column] = _arguments.integer(
                f"id_limits[{column!r}]", limit, owner="ShardDataset"
            )
        return limits

    @property
    def num_shards(self) -> int:
        """The number of shards in the log."""
        return len(self._paths)

    @functools.lru_cache(maxsize=2)  # noqa: B019  batches read one shard, then the next
    def _shard(self, shard: int) -> dict[str, np.ndarray]:
        """The shard's columns, memory-mapped.

        Only the last two shards stay mapped: pages of a mapped file count in the
        process's RSS once read, so keeping every shard mapped would make RSS
        grow with the log (0.6 GB more at 10^8 rows), although the kernel could
        reclaim them.
        """
        return {column: _open(path) for column, path in self._paths[shard].items()}

    @property
    def num_rows(self) -> int:
        return int(self._rows.sum())

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_rows / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def _epoch_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's shard order and each position's first row in it."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_shards)
        else:
            order = np.arange(self.num_shards)
        starts = np.concatenate([[0], np.cumsum(self._rows[order])])
        return order, starts

    def _rows_of(self, shard: int) -> np.ndarray | None:
        """The permutation of a shard's rows this epoch (None: in order)."""
        if not self.shuffle:
            return None
        return self._permutation(self.epoch, shard)

    @functools.lru_cache(maxsize=4)  # noqa: B019  the batches of a shard come together
    def _permutation(self, epoch: int, shard: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, shard, 1])
        return rng.permutation(int(self._rows[shard])).astype("int32")

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.num_batches:
            raise IndexError(f"Batch {index} is out of range [0, {self.num_batches}).")
        self._serve(index, self.num_batches)
        order, starts = self._plan
        first, last = index * self.batch_size, min((index + 1) * self.batch_size, starts[-1])
        parts: list[dict[str, np.ndarray]] = []
        position = int(np.searchsorted(starts, first, side="right") - 1)
        while first < last:
            shard = int(order[position])
            low, high = first - starts[position], min(last, starts[position + 1]) - starts[position]
            permutation = self._rows_of(shard)
            rows = np.arange(low, high) if permutation is None else permutation[low:high]
            parts.append(self._columns(shard, rows))
            first += high - low
            position += 1
        if len(parts) == 1:
            return self.split_label(parts[0])
        joined = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        return self.split_label(joined)

    def split_label(self, batch: dict[str, np.ndarray]) -> Any:
        """`batch` as `fit` takes it: `x`, or `(x, y)` with a `label` column."""
        if self.label is None:
            return batch
        x = dict(batch)
        return x, x.pop(LABEL)

    def epoch_shard(self, position: int) -> dict[str, np.ndarray]:
        """All rows of this epoch's `position`-th shard, in this epoch's order.

        Concatenated in the epoch's shard order and cut every `batch_size`
        rows, these are exactly the batches `__getitem__` gives (the
        TensorFlow backend streams them so, one Python call per shard). Reading
        position 0 starts the next epoch when the current one was finished,
        and the last position finishes it, as batch 0 and the last batch do.

        Args:
            position: the shard's position in this epoch's order, in
                `[0, num_shards)`.

        Returns:
            The shard's inputs keyed by model input name, ids checked; with a
            `label`, also the label column under the key `"__label__"`, which
            `split_label` splits off.
        """
        self._serve(position, self.num_shards)
        shard = int(self._plan[0][position])
        return self._columns(shard, self._rows_of(shard))

    def column_dtypes(self) -> dict[str, np.dtype]:
        """The dtype of each array `epoch_shard` returns, by key; the epoch does not move.

        For a `tf.data` signature. Unlike `peek`, the label is included (under
        `"__label__"`) when there is one.

        Returns:
            Key -> NumPy dtype, with the keys of `epoch_shard`'s dicts.
        """
        first = self._columns(int(self._plan[0][0]), np.arange(1))  # with any label
        return {name: values.dtype for name, values in first.items()}

    def _serve(self, part: int, parts: int) -> None:
        """Notes that batch (or shard) `part` of `parts` is read, moving the epoch.

        Part 0 starts a new pass if the last one was finished; the last part
        finishes this one.
        """
        if part == 0:
            self.on_epoch_end()
        self._epoch_finished = self._epoch_finished or part == parts - 1

    def _columns(self, shard: int, rows: np.ndarray | None) -> dict[str, np.ndarray]:
        """The inputs (and label) of `rows` (None: all, in order) of `shard`, ids checked."""
        batch = {}
        for name, column in self._reads.items():
            stored = self._shard(shard)[column]
            values = np.asarray(stored if rows is None else stored[rows])
            self._check_ids(values, column, shard, rows)
            batch[name] = values
        if self._frequency is not None:
            assert self.sampling_probability is not None
            ids = batch[self._column_names[self.sampling_probability]]
            batch[SAMPLING_PROBABILITY] = self._frequency[ids].astype("float32")
        return batch

    def _check_ids(
        self, values: np.ndarray, column: str, shard: int, rows: np.ndarray | None
    ) -> None:
        """Raises naming the shard and row when `values` (at `rows`, or all) leave the range."""
        limit = self.id_limits.get(column)
        if limit is None or values.size == 0 or (values.min() >= 0 and values.max() < limit):
            return
        bad = int(np.flatnonzero((values < 0) | (values >= limit))[0])
        row = bad if rows is None else int(rows[bad])
        raise ValueError(
            f"Column {column!r} of shard {self._names[shard]} holds {values[bad]} at "
            f"row {row}; ids must lie in [0, {limit})."
        )

    def peek(self) -> dict[str, np.ndarray]:
        """The first row of this epoch, as a batch of one; the epoch does not move.

        For shapes and dtypes (building towers, a `tf.data` signature): reading
        `dataset[0]` could count as the start of a pass.
        """
        shard = int(self._plan[0][0])
        first = self._rows_of(shard)
        batch = self._columns(shard, np.arange(1) if first is None else first[:1])
        batch.pop(LABEL, None)
        return batch

    def on_epoch_end(self) -> None:
        """Starts the next epoch, if the current one's last batch was served."""
        if not self._epoch_finished:
            return
        self.epoch += 1
        self._epoch_finished = False
        self._plan = self._epoch_plan()


def _column_map(columns: Any) -> dict[str, str]:
    """`columns` as a dict of model input name -> column, or a ValueError saying why not."""
    if columns is None:
        return {"query": "user", "candidate": "item"}
    example = "e.g. {'query': 'user', 'candidate': 'item'}"
    if not isinstance(columns, Mapping) or not columns:
        raise ValueError(
            f"`columns` must be a non-empty dict of model input name -> column, {example}. "
            f"Received: {columns!r} ({type(columns).__name__})"
        )
    for name, column in columns.items():
        if not isinstance(name, str) or not isinstance(column, str) or name == LABEL:
            raise ValueError(
                f"`columns` must map input names (str) to column names (str), {example}. "
                f"Received the entry {name!r}: {column!r}"
            )
    return dict(columns)


def _optional_name(argument: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(
            f"`{argument}` must be a column name (str) or None. "
            f"Received: {argument}={value!r} ({type(value).__name__})"
        )
    return value


def _open(
    path: Path, dtype: str | None = None, rows: int | None = None, size: int | None = None
) -> np.ndarray:
    """A `.npy` file, memory-mapped; a ValueError naming it when it is damaged.

    With `dtype`, `rows` and `size` (from the manifest), also checks that the file
    holds `rows` values of `dtype` and nothing more, and has `size` bytes: a stat
    and a header read, so every member of a log of 10^8 rows is checked in
    milliseconds. (`np.load` alone maps a file with bytes past its data, or
    another file's rows of the same dtype, without a word.)
    """
    if not path.is_file():
        raise FileNotFoundError(f"Shard file {path} is missing.")
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise ValueError(
            f"Shard file {path} has {actual} bytes; the manifest says {size}. It was "
            "truncated, emptied or replaced after the log was written: rewrite the log."
        )
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(
            f"Shard file {path} is corrupt or truncated ({actual} bytes): {error}"
        ) from error
    if dtype is None:
        return array
    if str(array.dtype) != dtype or array.shape != (rows,):
        raise ValueError(
            f"Shard file {path} holds {array.dtype} {array.shape}; the manifest "
            f"says {dtype} ({rows},)."
        )
    expected = getattr(array, "offset", 0) + array.nbytes
    if actual != expected:
        raise ValueError(
            f"Shard file {path} has {actual} bytes, but its header declares {expected} "
            f"({rows} {dtype} values): it was damaged after the log was written."
        )
    return array
