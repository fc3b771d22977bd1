"""A user's own classes, outside two_tower and Keras, as a project would define them.

`TwoTowerRetrieval.export` on JAX and torch loads the model in a TensorFlow child
process, which must import this module to find them (tests/test_export.py).
"""

from typing import Any

import keras

import two_tower


@keras.saving.register_keras_serializable(package="two_tower_tests")
class DoubledEmbedding(keras.layers.Embedding):
    """An Embedding whose output is doubled."""

    def call(self, inputs: Any) -> Any:
        return super().call(inputs) * 2


@keras.saving.register_keras_serializable(package="two_tower_tests")
class ScaledRetrieval(two_tower.TwoTowerRetrieval):
    """Scores 2 q.c: a subclass's `compute_similarities`, which serving must use too."""

    def compute_similarities(self, query_embeddings: Any, candidate_embeddings: Any) -> Any:
        return 2 * super().compute_similarities(query_embeddings, candidate_embeddings)
