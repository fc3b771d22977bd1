"""One version of `BruteForceIndex`'s catalogue: its rows as the search reads them, its ids.

`BruteForceIndex.index` builds a new one and swaps it in whole, so that each
search works on one version, whatever `index` does meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
from keras import ops

from two_tower.backends import backend_module
from two_tower.distribution import _sharding
from two_tower.distribution._sharding import ShardedCatalogue
from two_tower.retrieval._candidate_ids import CandidateIds
from two_tower.retrieval._catalogue_store import ChunkStore
from two_tower.retrieval.top_k import BLOCK
from two_tower.types import Tensor


class IndexedCatalogue(NamedTuple):
    """One indexed catalogue, replaced as a whole so that readers see one version.

    On one device `host` holds the rows in zero-padded chunks (the one copy of
    the catalogue, see `two_tower.retrieval._catalogue_store`) and `chunks` the backend
    tensors of those chunks, sharing their memory on CPU. Under a
    `keras.distribution` distribution both are None: `sharded` holds the chunks,
    each spread by rows over every device of the mesh (see
    `_sharding.shard_catalogue`).
    """

    host: ChunkStore | None
    chunks: tuple[Tensor, ...] | None
    ids: np.ndarray
    order: np.ndarray  # argsort of `ids`
    sorted_ids: np.ndarray
    dim: int
    sharded: ShardedCatalogue | None = None
    # Per-candidate attributes for `where` filters (read-only NumPy arrays).
    attributes: Mapping[str, np.ndarray] | None = None
    # Made by the first `add`, `remove` or `update` (`_id_book.IdBook`):
    # the buffers those change in place, and the positions of ids added since
    # `sorted_ids` was made.
    buffers: Any = None

    def layout(self) -> tuple[int, int]:
        """(devices, candidates per device per step); the tail scores -inf."""
        if self.sharded is not None:
            return self.sharded.shards, self.sharded.width
        assert self.host is not None
        return 1, self.host.width


def indexed_catalogue(
    store: ChunkStore,
    ids: CandidateIds,
    chunk_size: int,
    attributes: Mapping[str, np.ndarray] | None = None,
) -> IndexedCatalogue:
    """`store` as the search reads it: sharded under a distribution, else backend tensors."""
    sharded = _sharding.shard_catalogue(store, chunk_size, BLOCK)
    return IndexedCatalogue(
        host=None if sharded is not None else store,
        chunks=None if sharded is not None else tuple(map(chunk_tensor, store.chunks)),
        ids=ids.ids,
        order=ids.order,
        # Sorted once here: `positions_of` runs once per query with exclusions.
        sorted_ids=ids.sorted_ids,
        dim=store.dim,
        sharded=sharded,
        attributes=attributes,
    )


def chunks_of(catalogue: IndexedCatalogue, columns: int) -> Iterator[tuple[int, Tensor]]:
    """(first position, `columns` candidates) per step, the last padded with zeros."""
    num_candidates = len(catalogue.ids)
    # Already cut (and padded with zeros, or spread over the devices) by `index`.
    chunks = catalogue.chunks if catalogue.sharded is None else catalogue.sharded.chunks
    assert chunks is not None
    yield from zip(range(0, num_candidates, columns), chunks, strict=True)


def chunk_tensor(chunk: np.ndarray) -> Tensor:
    """A backend tensor of one aligned chunk, sharing its memory where it can."""
    if chunk.dtype.name in ("float16", "float32", "float64"):
        return backend_module().host_tensor(chunk)
    return ops.convert_to_tensor(chunk)  # e.g. bfloat16, which DLPack may not carry


def host_embeddings(catalogue: IndexedCatalogue) -> np.ndarray:
    """The `[candidates, dim]` catalogue as one NumPy array."""
    if catalogue.host is not None:
        stored = catalogue.host[0 : catalogue.host.num_rows]
        # One chunk gives a view of the store, which the backend reads in place.
        return stored.copy() if len(catalogue.host.chunks) == 1 else stored
    assert catalogue.sharded is not None
    rows = [np.asarray(ops.convert_to_numpy(chunk)) for chunk in catalogue.sharded.chunks]
    return np.concatenate([chunk.reshape(-1, catalogue.dim) for chunk in rows])[
        : len(catalogue.ids)
    ]
