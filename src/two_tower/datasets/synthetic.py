"""A synthetic interaction log of any size, with its own ground truth.

Users and items belong to latent clusters. Each interaction's user is drawn
uniformly; with probability `affinity` its item comes from the user's cluster,
otherwise from the whole catalogue, in both cases in proportion to a power-law
popularity (`popularity_exponent`: the item of popularity rank r has weight
`r ** -popularity_exponent`). Timestamps increase by one second per interaction,
so the log is in time order.

The log is made in chunks, each from its own seeded generator, so a chunk costs
O(chunk + items) memory whatever the total, and the same `seed` and
`chunk_size` always give the same log. `write_shards` writes it to disk as
one folder of `.npy` columns per shard (memory-mappable), with a manifest
holding the counts, the parameters and each file's sha256.

`SyntheticLog.ideal_scores` is the true probability of each item for given
users: ranking by it is the best any model can do, and ranking by popularity is
the baseline, so a test can check that a model learns the clusters.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from two_tower import _arguments
from two_tower.datasets import _shard_log
from two_tower.saving._files import sha256 as _sha256

MANIFEST = _shard_log.MANIFEST
_WRITE = "write_shards"
COLUMNS = ("user", "item", "timestamp")
_DTYPES = {"user": "int32", "item": "int32", "timestamp": "int64"}


@dataclass(frozen=True)
class SyntheticLog:
    """The generator of a synthetic log, and its ground truth.

    Args:
        num_users: users, ids `0..num_users-1`.
        num_items: items, ids `0..num_items-1`.
        num_clusters: latent clusters shared by users and items.
        popularity_exponent: power-law exponent of item popularity (>= 0; 0 is
            uniform).
        affinity: probability that an interaction stays in the user's cluster.
        seed: the log's seed, an integer >= 0.
        start_time: timestamp of the first interaction (seconds).

    Numbers may be Python or NumPy scalars (`np.int64(20)`); they are stored
    as Python values.

    Raises:
        ValueError: counts that are not positive integers, more clusters than
            items, a `popularity_exponent` that is negative or not finite, an
            `affinity` outside [0, 1], a negative or non-integer `seed`, or a
            non-integer `start_time`.

    Examples:
        >>> log = two_tower.datasets.synthetic.SyntheticLog(num_users=50, num_items=30)
        >>> chunk = next(log.chunks(100, chunk_size=64))
        >>> sorted(chunk), chunk["item"].shape
        (['item', 'timestamp', 'user'], (64,))
    """

    num_users: int
    num_items: int
    num_clusters: int = 20
    popularity_exponent: float = 1.0
    affinity: float = 0.8
    seed: int = 0
    start_time: int = 1_600_000_000

    def __post_init__(self) -> None:
        # Python values, so that `config()` (the manifest) is JSON whatever was passed.
        owner = "SyntheticLog"
        checked = {
            "num_users": _arguments.integer("num_users", self.num_users, owner=owner),
            "num_items": _arguments.integer("num_items", self.num_items, owner=owner),
            "num_clusters": _arguments.integer("num_clusters", self.num_clusters, owner=owner),
            "popularity_exponent": _arguments.number(
                "popularity_exponent", self.popularity_exponent, minimum=0.0, owner=owner
            ),
            "affinity": _arguments.number(
                "affinity", self.affinity, minimum=0.0, maximum=1.0, owner=owner
            ),
            "seed": _arguments.integer("seed", self.seed, minimum=0, owner=owner),
            "start_time": _arguments.integer(
                "start_time", self.start_time, minimum=None, owner=owner
            ),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        if self.num_clusters > self.num_items:
            raise ValueError(
                f"`num_clusters` (={self.num_clusters}) must not exceed `num_items` "
                f"(={self.num_items}): every cluster needs an item."
            )

    # ------------------------------------------------------------ ground truth
    @functools.cached_property
    def _truth(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """User clusters, item clusters and item popularity weights (summing to 1)."""
        rng = np.random.default_rng([self.seed, 2**31])
        user_clusters = rng.integers(0, self.num_clusters, self.num_users)
        # Every cluster holds at least one item.
        item_clusters = rng.permutation(np.arange(self.num_items) % self.num_clusters)
        ranks = rng.permutation(self.num_items) + 1
        weights = ranks.astype("float64") ** -float(self.popularity_exponent)
        return user_clusters, item_clusters, weights / weights.sum()

    @property
    def user_clusters(self) -> np.ndarray:
        """`[num_users]` cluster of each user."""
        return self._truth[0]

    @property
    def item_clusters(self) -> np.ndarray:
        """`[num_items]` cluster of each item."""
        return self._truth[1]

    @property
    def popularity(self) -> np.ndarray:
        """`[num_items]` popularity weights, summing to 1."""
        return self._truth[2]

    def ideal_scores(self, users: Any) -> np.ndarray:
        """`[len(users), num_items]` true probability of each item for each user.

        Raises:
            ValueError: `users` that are not integer ids in `[0, num_users)`.
        """
        user_clusters, item_clusters, weights = self._truth
        users = np.asarray(users).reshape(-1)
        if users.size and (
            users.dtype.kind not in "iu" or users.min() < 0 or users.max() >= self.num_users
        ):
            raise ValueError(
                f"`users` must be integer ids in [0, {self.num_users}). Received "
                f"{users.dtype} values from {users.min()} to {users.max()}."
            )
        cluster_mass = np.bincount(item_clusters, weights=weights, minlength=self.num_clusters)
        own = item_clusters[None, :] == user_clusters[users][:, None]
        in_cluster = np.where(own, weights[None, :] / cluster_mass[item_clusters][None, :], 0.0)
        return self.affinity * in_cluster + (1 - self.affinity) * weights[None, :]

    # ------------------------------------------------------------------- log
    def chunks(
        self, num_interactions: int, chunk_size: int = 1_000_000
    ) -> Iterator[dict[str, np.ndarray]]:
        """The log, `chunk_size` interactions at a time (the last chunk may be shorter).

        Args:
            num_interactions: total interactions.
            chunk_size: interactions per chunk; part of what defines the log.

        Yields:
            `{"user": int32, "item": int32, "timestamp": int64}` arrays.
        """
        total = _arguments.integer("num_interactions", num_interactions, owner="chunks")
        chunk_size = _arguments.integer("chunk_size", chunk_size, owner="chunks")
        user_clusters, item_clusters, weights = self._truth
        order = np.argsort(item_clusters, kind="stable")  # items grouped by cluster
        bounds = np.searchsorted(item_clusters[order], np.arange(self.num_clusters + 1))
        global_cdf = np.cumsum(weights)
        cluster_cdfs = [
            np.cumsum(weights[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        for index, start in enumerate(range(0, total, chunk_size)):
            count = min(chunk_size, total - start)
            rng = np.random.default_rng([self.seed, index])
            users = rng.integers(0, self.num_users, count).astype("int32")
            draws = rng.uniform(size=count)
            stays = rng.uniform(size=count) < self.affinity
            items = np.minimum(
                np.searchsorted(global_cdf, draws * global_cdf[-1], side="right"),
                self.num_items - 1,
            )
            clusters = user_clusters[users]
            for cluster in np.unique(clusters[stays]):
                rows = np.flatnonzero(stays & (clusters == cluster))
                cdf = cluster_cdfs[cluster]
                picked = np.searchsorted(cdf, draws[rows] * cdf[-1], side="right")
                picked = np.minimum(picked, cdf.shape[0] - 1)
                items[rows] = order[bounds[cluster] + picked]
            yield {
                "user": users,
                "item": items.astype("int32"),
                "timestamp": self.start_time + np.arange(start, start + count, dtype="int64"),
            }

    def to_arrays(
        self, num_interactions: int, chunk_size: int = 1_000_000
    ) -> dict[str, np.ndarray]:
        """The whole log in memory (for small logs and tests)."""
        parts = list(self.chunks(num_interactions, chunk_size))
        return {name: np.concatenate([part[name] for part in parts]) for name in COLUMNS}

    def config(self) -> dict[str, Any]:
        """The generator's parameters, as stored in a shard manifest."""
        return {
            "num_users": self.num_users,
            "num_items": self.num_items,
            "num_clusters": self.num_clusters,
            "popularity_exponent": self.popularity_exponent,
            "affinity": self.affinity,
            "seed": self.seed,
            "start_time": self.start_time,
        }


def write_shards(
    log: SyntheticLog,
    folder: str | os.PathLike[str],
    num_interactions: int,
    shard_size: int = 1_000_000,
    overwrite: bool = False,
) -> Path:
    """Writes `log` to `folder` as shards of `.npy` columns, in bounded memory.

    Shard k is `folder/generation-<hex>/shard-{k:05d}/{user,item,timestamp}.npy`
    (one generator chunk each); `folder/manifest.json` lists the shards, their row
    counts, each file's size and sha256, and the generator's parameters.

    The write is atomic: a kill or an error at any moment leaves `folder` holding
    the old log or the new one, loadable, never neither and never a mix. A new
    folder is written beside `folder` and renamed into place. Over an existing log
    (`overwrite=True`) the new shards go into a new generation folder beside the old
    ones, and the manifest is swapped in with one `os.replace`; the old shards are
    deleted after (see `two_tower.datasets._shard_log` for why). What killed writes
    leave behind (a hidden `.<folder>.staging-*` folder beside it, a generation
    folder the manifest does not name) is removed by the next write to `folder`.
    Write each folder from one process at a time. Files and the manifest are
    fsynced before the swap, so the manifest never names data still in flight.

    Args:
        log: the generator, a `SyntheticLog`.
        folder: where the log goes; must not exist unless `overwrite`.
        num_interactions: total interactions, a positive integer.
        shard_size: interactions per shard (the generator's chunk size).
        overwrite: replace an existing `folder`: a log (atomically, as above) or,
            if it holds no log, the whole folder.

    Returns:
        `folder` as a `Path`.

    Raises:
        FileExistsError: `folder` exists and `overwrite` is False, or it is a file.
        ValueError: `log` is not a `SyntheticLog`, or a count or `overwrite` is
            not what it must be.

    Examples:
        >>> import tempfile, os
        >>> folder = os.path.join(tempfile.mkdtemp(), "log")
        >>> log = two_tower.datasets.synthetic.SyntheticLog(5, 8, num_clusters=2)
        >>> _ = two_tower.datasets.synthetic.write_shards(log, folder, 30, shard_size=20)
        >>> _ = two_tower.datasets.synthetic.write_shards(log, folder, 50, overwrite=True)
        >>> two_tower.datasets.ShardDataset(folder).num_rows
        50
    """
    if not isinstance(log, SyntheticLog):
        raise ValueError(
            "`log` must be a two_tower.datasets.synthetic.SyntheticLog. Received: "
            f"{type(log).__name__}. To stream arrays of your own, write them as shards "
            "in the same layout (one folder of .npy columns per shard, and a manifest)."
        )
    num_interactions = _arguments.integer("num_interactions", num_interactions, owner=_WRITE)
    shard_size = _arguments.integer("shard_size", shard_size, owner=_WRITE)
    overwrite = _arguments.boolean("overwrite", overwrite, owner=_WRITE)

    def fill(generation_folder: Path, generation: str) -> dict[str, Any]:
        generation_folder.mkdir()
        shards = []
        for index, chunk in enumerate(log.chunks(num_interactions, shard_size)):
            name = f"shard-{index:05d}"
            (generation_folder / name).mkdir()
            hashes, sizes = {}, {}
            for column in COLUMNS:
                path = generation_folder / name / f"{column}.npy"
                with open(path, "wb") as handle:
                    np.save(handle, chunk[column].astype(_DTYPES[column]))
                    handle.flush()
                    os.fsync(handle.fileno())
                hashes[column] = _sha256(path)
                sizes[column] = path.stat().st_size
            shards.append(
                {
                    "name": f"{generation}/{name}",
                    "rows": int(chunk["user"].shape[0]),
                    "sha256": hashes,
                    "bytes": sizes,
                }
            )
        return {
            "format": _shard_log.FORMAT,
            "rows": num_interactions,
            "columns": dict(_DTYPES),
            "generator": log.config(),
            "shard_size": shard_size,
            "shards": shards,
        }

    return _shard_log.replace_log(Path(folder), overwrite, fill)
