"""A tower over a dict of features: categorical, multi-valued and numeric."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras
from keras import ops

from two_tower.types import Tensor


@keras.saving.register_keras_serializable(package="two_tower")
class FeatureTower(keras.layers.Layer):
    """Embeds a dict of features into one `[batch, output_dim]` embedding.

    - Categorical features (one index per row, e.g. from `two_tower.Vocabulary`)
      get their own embedding table.
    - Multi-valued features (`[batch, length]` indices, e.g. genres or title
      tokens, padded with -1) are embedded and mean-pooled over the non-padding
      entries; a row with no entries pools to zeros.
    - Numeric features (`[batch]` floats) are concatenated as they are; NaN
      becomes 0.0, so a missing value never turns into a NaN embedding.
    The concatenation goes through an optional MLP (`hidden_units`, ReLU), a
    final Dense to `output_dim`, and optionally L2 normalisation.

    Indices must lie in `[0, vocabulary size)`; `Vocabulary` guarantees that
    for raw values, so unseen values never crash a gather.

    Args:
        categorical: feature name -> vocabulary size.
        multivalued: feature name -> vocabulary size (padding is -1).
        numeric: names of float features.
        embedding_dim: width of every embedding table.
        hidden_units: widths of the ReLU layers before the output.
        output_dim: width of the tower's output.
        l2_normalize: L2-normalise the output (for cosine scoring).
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> import numpy as np
    >>> tower = two_tower.FeatureTower(
    ...     categorical={"occupation": 21}, multivalued={"genres": 19},
    ...     numeric=["age"], output_dim=8)
    >>> features = {"occupation": np.array([3, 5]), "age": np.array([0.2, np.nan]),
    ...             "genres": np.array([[1, 4, -1], [-1, -1, -1]])}
    >>> tuple(tower(features).shape)
    (2, 8)
    """

    def __init__(
        self,
        categorical: Mapping[str, int] | None = None,
        multivalued: Mapping[str, int] | None = None,
        numeric: Sequence[str] = (),
        embedding_dim: int = 32,
        hidden_units: Sequence[int] = (),
        output_dim: int = 32,
        l2_normalize: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.categorical = dict(categorical or {})
        self.multivalued = dict(multivalued or {})
        self.numeric = list(numeric)
        names = [*self.categorical, *self.multivalued, *self.numeric]
        if not names:
            raise ValueError("FeatureTower needs at least one feature.")
        if len(set(names)) != len(names):
            raise ValueError(f"Feature names must be distinct. Received: {names}")
        for name, size in {**self.categorical, **self.multivalued}.items():
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(
                    f"Vocabulary size of feature {name!r} must be a positive integer. "
                    f"Received: {size!r}"
                )
        for name, value in (("embedding_dim", embedding_dim), ("output_dim", output_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer. Received: {value!r}")
        self.embedding_dim = embedding_dim
        self.hidden_units = list(hidden_units)
        self.output_dim = output_dim
        self.l2_normalize = l2_normalize
        self.embeddings = {
            name: keras.layers.Embedding(size, embedding_dim, name=f"{name}_embedding")
            for name, size in {**self.categorical, **self.multivalued}.items()
        }
        self.hidden = [keras.layers.Dense(units, activation="relu") for units in hidden_units]
        self.output_layer = keras.layers.Dense(output_dim)

    def build(self, input_shape: Any = None) -> None:
        for layer in self.embeddings.values():
            layer.build((None,))
        width = self.embedding_dim * len(self.embeddings) + len(self.numeric)
        for layer in self.hidden:
            layer.build((None, width))
            width = layer.units
        self.output_layer.build((None, width))
        self.built = True

    def _feature(self, features: Mapping[str, Any], name: str, rank: int) -> Tensor:
        if name not in features:
            raise ValueError(f"Feature {name!r} is missing. Received features: {sorted(features)}")
        value = ops.convert_to_tensor(features[name])
        if len(value.shape) == rank + 1 and rank == 1 and value.shape[-1] == 1:
            value = ops.squeeze(value, axis=-1)  # [batch, 1] is a scalar per row too
        if len(value.shape) != rank:
            kind = "one value per row, shape [batch]" if rank == 1 else "shape [batch, length]"
            raise ValueError(
                f"Feature {name!r} must have {kind}. Received shape {tuple(value.shape)}"
            )
        return value

    def call(self, features: Mapping[str, Any]) -> Tensor:
        if not isinstance(features, Mapping):
            raise ValueError(
                f"FeatureTower takes a dict of features. Received {type(features).__name__}"
            )
        parts = []
        for name in self.categorical:
            value = self._feature(features, name, rank=1)
            _check_integer(name, value)
            parts.append(self.embeddings[name](value))
        for name in self.multivalued:
            value = self._feature(features, name, rank=2)
            _check_integer(name, value)
            present = ops.cast(ops.greater_equal(value, 0), "float32")
            embedded = self.embeddings[name](ops.maximum(value, 0))
            summed = ops.sum(embedded * ops.expand_dims(present, -1), axis=1)
            count = ops.maximum(ops.sum(present, axis=1, keepdims=True), 1.0)
            parts.append(summed / count)
        for name in self.numeric:
            value = ops.cast(self._feature(features, name, rank=1), "float32")
            value = ops.where(ops.isnan(value), ops.zeros_like(value), value)
            parts.append(ops.expand_dims(value, -1))
        hidden = ops.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        for layer in self.hidden:
            hidden = layer(hidden)
        output = self.output_layer(hidden)
        if self.l2_normalize:
            output = output / ops.maximum(ops.norm(output, axis=-1, keepdims=True), 1e-12)
        return output

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "categorical": self.categorical,
                "multivalued": self.multivalued,
                "numeric": self.numeric,
                "embedding_dim": self.embedding_dim,
                "hidden_units": self.hidden_units,
                "output_dim": self.output_dim,
                "l2_normalize": self.l2_normalize,
            }
        )
        return config


def _check_integer(name: str, value: Tensor) -> None:
    dtype = keras.backend.standardize_dtype(value.dtype)
    if not (dtype.startswith("int") or dtype.startswith("uint")):
        raise ValueError(
            f"Feature {name!r} must hold integer indices (map raw values with "
            f"two_tower.Vocabulary). Received dtype {dtype}"
        )
