"""Type aliases and names shared by the package.

`Tensor` is `Any` so that type checking needs no backend installed, as in keras-rs.
"""

from collections.abc import Callable
from typing import Any

Tensor = Any
"""A backend tensor (JAX array, `tf.Tensor` or `torch.Tensor`) or a NumPy array."""

SimilarityFn = Callable[[Tensor, Tensor], Tensor]
"""`f(query_embeddings, candidate_embeddings) -> [queries, candidates]` scores."""

SAMPLING_PROBABILITY = "candidate_sampling_probability"
"""The input key of each candidate's sampling probability (logQ correction): read by the
model and written by `ShardDataset`."""
