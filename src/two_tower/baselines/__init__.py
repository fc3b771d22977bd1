"""Non-neural baselines to put beside a two-tower model, in NumPy: popularity and EASE.

Each has `fit`, `embed_histories` and `catalogue_embeddings`: the dot product of
a history's embedding with the catalogue's is the baseline's score, so
`two_tower.evaluation.evaluate_retrieval` ranks it on the same protocol, with
the same exclusions and tie rule, as a trained model.
"""

from two_tower.baselines.ease import EASE
from two_tower.baselines.popularity import Popularity

__all__ = ["EASE", "Popularity"]
