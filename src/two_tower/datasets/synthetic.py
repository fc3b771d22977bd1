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
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from two_tower.datasets._files import sha256 as _sha256

MANIFEST = "manifest.json"
COLUMNS = ("user", "item", "timestamp")
_DTYPES = {"user": "int32", "item": "int32", "timestamp": "int64"}


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return int(value)


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
        seed: the log's seed.
        start_time: timestamp of the first interaction (seconds).

    Raises:
        ValueError: counts that are not positive integers, more clusters than
            items, a negative `popularity_exponent`, or an `affinity` outside
            [0, 1].

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
        for name in ("num_users", "num_items", "num_clusters"):
            _positive_int(name, getattr(self, name))
        if self.num_clusters > self.num_items:
            raise ValueError(
                f"`num_clusters` (={self.num_clusters}) must not exceed `num_items` "
                f"(={self.num_items}): every cluster needs an item."
            )
        exponent = self.popularity_exponent
        if isinstance(exponent, bool) or not isinstance(exponent, (int, float)) or exponent < 0:
            raise ValueError(f"`popularity_exponent` must be a number >= 0. Received: {exponent!r}")
        if isinstance(self.affinity, bool) or not 0 <= self.affinity <= 1:
            raise ValueError(f"`affinity` must lie in [0, 1]. Received: {self.affinity!r}")

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
        """`[len(users), num_items]` true probability of each item for each user."""
        user_clusters, item_clusters, weights = self._truth
        users = np.asarray(users).reshape(-1)
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
        total = _positive_int("num_interactions", num_interactions)
        chunk_size = _positive_int("chunk_size", chunk_size)
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

    Shard k is `folder/shard-{k:05d}/{user,item,timestamp}.npy` (one generator
    chunk each); `folder/manifest.json` lists the shards, their row counts and
    each file's sha256, and the generator's parameters. Everything is written
    into a temporary folder beside `folder` and renamed into place at the end,
    so an interrupted write never leaves a partial log at `folder`.

    Args:
        log: the generator.
        folder: where the log goes; must not exist unless `overwrite`.
        num_interactions: total interactions.
        shard_size: interactions per shard (the generator's chunk size).
        overwrite: replace an existing `folder`.

    Returns:
        `folder` as a `Path`.

    Raises:
        FileExistsError: if `folder` exists and `overwrite` is False.
    """
    target = Path(folder)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} already exists; pass overwrite=True to replace it, or choose another folder."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shards = []
        for index, chunk in enumerate(log.chunks(num_interactions, shard_size)):
            name = f"shard-{index:05d}"
            (staging / name).mkdir()
            files = {}
            for column in COLUMNS:
                path = staging / name / f"{column}.npy"
                np.save(path, chunk[column].astype(_DTYPES[column]))
                files[column] = _sha256(path)
            shards.append({"name": name, "rows": int(chunk["user"].shape[0]), "sha256": files})
        manifest = {
            "format": "two_tower.synthetic/1",
            "rows": int(num_interactions),
            "columns": dict(_DTYPES),
            "generator": log.config(),
            "shard_size": int(shard_size),
            "shards": shards,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
