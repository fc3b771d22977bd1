"""Training `FaissIndex`'s faiss index, and calibrating its `nprobe` to a target recall."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from two_tower.retrieval._catalogue_store import row_pieces, take_rows

PQ_CENTROIDS = 256  # 8-bit codes: each subquantizer trains 256 centroids
SEED_RANGE = 2**31  # faiss' k-means seed is a C int


def trained_index(
    faiss: Any,
    rows: Any,
    nlist: int | None,
    pq: int | None,
    train_size: int | None,
    seed: int,
    rng: np.random.Generator,
) -> Any:
    """An IVF index (IVF-PQ with `pq` subquantizers) trained on a sample of `rows`, holding all.

    Args:
        faiss: the faiss module.
        rows: the catalogue, an array or a `ChunkStore`.
        nlist: `FaissIndex`'s `nlist` (None: about `sqrt(rows)`).
        pq: `FaissIndex`'s `pq_subquantizers` (None: IVF-Flat).
        train_size: `FaissIndex`'s `train_size` (None: its default).
        seed: faiss' k-means seed (taken modulo 2**31).
        rng: draws the training sample.

    Raises:
        ValueError: `nlist` above the catalogue size, a dim that `pq` does not
            divide, fewer than 256 candidates for IVF-PQ, or a `train_size`
            below `nlist` (or below 256 with IVF-PQ).
    """
    num, dim = rows.shape
    nlist = nlist or max(1, min(round(math.sqrt(num)), num // 39))
    if nlist > num:
        raise ValueError(
            f"`nlist` (={nlist}) must not exceed the candidates (={num}): k-means "
            "needs a training row per list. Pass a smaller `nlist`, or None."
        )
    if pq is not None and dim % pq:
        raise ValueError(f"`pq_subquantizers` (={pq}) must divide the embedding dim (={dim}).")
    if pq is not None and num < PQ_CENTROIDS:
        raise ValueError(
            f"IVF-PQ needs at least {PQ_CENTROIDS} candidates to train its codebooks "
            f"({PQ_CENTROIDS} centroids per subquantizer). Received {num}: use IVF-Flat "
            "(`pq_subquantizers=None`) for a catalogue this small."
        )
    default_size = 64 * nlist if pq is None else max(64 * nlist, PQ_CENTROIDS * 39)
    size = min(num, train_size or default_size)
    needed = nlist if pq is None else max(nlist, PQ_CENTROIDS)
    if size < needed:
        what = (
            f"`nlist` (={nlist})"
            if pq is None or nlist >= PQ_CENTROIDS
            else (f"the {PQ_CENTROIDS} centroids of each IVF-PQ codebook")
        )
        raise ValueError(
            f"`train_size` (={train_size}) must be at least {needed}: k-means needs a "
            f"training row for each of {what}. Pass a larger `train_size`, or None "
            f"(the default, {default_size} rows capped at the catalogue)."
        )
    sample = take_rows(rows, np.sort(rng.choice(num, size=size, replace=False)))
    quantizer = faiss.IndexFlatIP(dim)
    if pq is None:
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq, 8, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed % SEED_RANGE
    index.train(sample)
    for piece in row_pieces(rows):
        index.add(np.ascontiguousarray(piece, dtype="float32"))
    return index


def calibrated_nprobe(
    faiss: Any, index: Any, rows: Any, queries: np.ndarray, k: int, target_recall: float
) -> tuple[int, float]:
    """`(nprobe, recall@k)`: the smallest `nprobe` reaching `target_recall`.

    A binary search over `1..nlist`, each step a faiss search of `queries`
    compared with their exact top k over `rows` (an array or a `ChunkStore`).
    When no `nprobe` reaches the target it warns and returns `nlist`, all lists.
    """
    exact = exact_positions(queries, rows, k)
    nlist = int(index.nlist)

    def recall(nprobe: int) -> float:
        parameters = faiss.SearchParametersIVF(nprobe=nprobe)
        _, found = index.search(queries, k, params=parameters)
        hits = [len(np.intersect1d(f, e)) for f, e in zip(found, exact, strict=True)]
        return float(np.mean(hits) / k)

    low, high = 0, nlist  # recall(low) < target <= recall(high), or high = nlist
    reached = {nlist: recall(nlist)}
    while high - low > 1:
        middle = (low + high) // 2
        reached[middle] = recall(middle)
        if reached[middle] >= target_recall:
            high = middle
        else:
            low = middle
    if reached[high] < target_recall:
        warnings.warn(
            f"FaissIndex: target_recall={target_recall} is out of reach; probing "
            f"all {nlist} lists gives recall@{k} {reached[high]:.3f} (IVF-PQ loses "
            "precision in its codes: raise `pq_subquantizers`, or use IVF-Flat).",
            stacklevel=3,
        )
    return high, reached[high]


def exact_positions(queries: np.ndarray, rows: Any, k: int) -> np.ndarray:
    """Exact top-k positions per query, a block of rows at a time (for calibration)."""
    best_scores = np.full((len(queries), 0), -np.inf, "float32")
    best = np.zeros((len(queries), 0), "int64")
    start = 0
    for piece in row_pieces(rows):
        scores = np.concatenate([best_scores, queries @ np.asarray(piece, "float32").T], axis=1)
        positions = np.concatenate(
            [
                best,
                np.broadcast_to(np.arange(start, start + len(piece)), (len(queries), len(piece))),
            ],
            axis=1,
        )
        if scores.shape[1] > k:
            keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores = np.take_along_axis(scores, keep, axis=1)
            positions = np.take_along_axis(positions, keep, axis=1)
        best_scores, best = scores, positions
        start += len(piece)
    return best
