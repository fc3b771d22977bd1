"""`BruteForceIndex`'s compiled step: one chunk scored, its top k merged into the running top k."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import keras
from keras import ops

from two_tower.backends import backend_module
from two_tower.retrieval import _tiled_top_k
from two_tower.retrieval.top_k import _per_device_top_k, dot_similarities, stable_top_k
from two_tower.types import SimilarityFn, Tensor


class TopKStep:
    """Scores one chunk and merges its top k into the running top k.

    Compiled once per scoring function, k and chunk width with the backend's
    compiler (`two_tower.backends`). `owner` is the layer whose method
    `similarity_fn` is, if any: its variables (e.g. a learned temperature) are
    read at every call rather than frozen into the step at trace time.

    With a `tile` (given where `_tiled_top_k.usable` says it pays, on one
    device), the chunk is scored `tile` candidates at a time (see
    `_tiled_top_k`), and exclusions and allow-lists come as `(query, block)`
    bits (`_tiled_top_k.merged_bits`); otherwise whole, its `[queries, chunk]`
    scores ranked by `top_k._blocked_top_k`. Both give the same results.
    """

    def __init__(
        self,
        similarity_fn: SimilarityFn,
        k: int,
        chunk_size: int,
        owner: Any = None,
        mesh: Any = None,
        tile: int = 0,
    ) -> None:
        self.k = k
        self.chunk_size = chunk_size  # candidates per call, over all devices
        self.mesh = mesh  # the DeviceMesh a sharded catalogue is spread over
        self.shards = 1 if mesh is None else math.prod(mesh.shape)
        self.similarity_fn = similarity_fn
        self.tile = tile  # 0: the chunk is scored whole
        self.dot = similarity_fn is dot_similarities
        if isinstance(owner, keras.layers.Layer):
            variables: Callable[[], Sequence[keras.Variable]] = lambda: owner.variables  # noqa: E731
        else:
            variables = list
        self._compiled = backend_module().compile_inference(self.call, variables)

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Tensor]:
        outputs: dict[str, Tensor] = self._compiled(inputs)
        return outputs

    def tiled_passes(self, rows: int | None) -> tuple[bool, bool]:
        """`(by_candidates, by_einsum)` of `_tiled_top_k.tiled_top_k` for `rows` queries.

        The dot product takes the fastest pair of operations whose scores agree
        bit for bit on this backend (see `two_tower.backends`); any other
        similarity is called as it is in both passes.
        """
        module = backend_module()
        threshold = module.search_candidates_major_rows
        by_candidates = (
            self.dot
            and threshold is not None
            and (threshold == 0 or (rows is not None and rows >= threshold))
        )
        return by_candidates, self.dot and module.search_rescore_einsum

    def call(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.tile:
            scores, columns = _tiled_top_k.tiled_top_k(
                inputs, self.similarity_fn, self.k, self.tile,
                *self.tiled_passes(inputs["queries"].shape[0]),
            )  # fmt: skip
            return self._merged(inputs, scores, columns)
        chunk = inputs["chunk"]  # [chunk_size, dim], or [*mesh shape, width, dim]
        if len(chunk.shape) > 2:  # sharded (JAX): static shapes
            chunk = ops.reshape(chunk, (self.chunk_size, chunk.shape[-1]))
        scores = self.similarity_fn(inputs["queries"], chunk)
        if "num_valid" in inputs:  # the last chunk, padded with zero rows
            # The chunk width is static (TensorFlow may relax traced shapes).
            columns = ops.arange(self.chunk_size, dtype="int32")
            valid = ops.expand_dims(ops.less(columns, inputs["num_valid"][0]), 0)
            scores = ops.where(valid, scores, float("-inf"))
        if "allowed" in inputs:  # a filter shared by every query: [chunk] bools
            scores = ops.where(ops.expand_dims(inputs["allowed"], 0), scores, float("-inf"))
        if "restricted" in inputs:  # rows with an allow-list keep its pairs only
            kept = ops.full_like(scores, float("-inf"))
            if "allowed_pairs" in inputs:
                pairs = inputs["allowed_pairs"]
                flat = pairs[:, 0] * ops.shape(scores)[1] + pairs[:, 1]
                kept = ops.scatter_update(kept, pairs, ops.take(ops.reshape(scores, (-1,)), flat))
            scores = ops.where(ops.expand_dims(inputs["restricted"], 1), kept, scores)
        if "excluded" in inputs:
            indices = inputs["excluded"]
            minus_inf = ops.full_like(indices[:, 0], float("-inf"), dtype=scores.dtype)
            scores = ops.scatter_update(scores, indices, minus_inf)
        width = self.chunk_size // self.shards
        scores, columns = _per_device_top_k(scores, min(self.k, width), self.mesh)
        return self._merged(inputs, scores, columns)

    def _merged(
        self, inputs: dict[str, Tensor], scores: Tensor, columns: Tensor
    ) -> dict[str, Tensor]:
        # Every running position is lower than this chunk's, each device's
        # positions lower than the next device's, and every part is in (score,
        # position) order, so among equal scores the lower merged column is the
        # lower position. Placeholders (-inf, -1) lose to any real candidate.
        merged_scores = ops.concatenate([inputs["best_scores"], scores], axis=1)
        merged_positions = ops.concatenate(
            [inputs["best_positions"], columns + inputs["start"][0]], axis=1
        )
        best_scores, order = stable_top_k(merged_scores, self.k)
        best_positions = ops.take_along_axis(merged_positions, order, axis=1)
        return {"scores": best_scores, "positions": best_positions}
