"""two_tower: two-tower retrieval recommenders on Keras 3 (JAX, TensorFlow, PyTorch)."""

from two_tower import datasets, losses
from two_tower.brute_force_index import BruteForceIndex
from two_tower.two_tower_retrieval import TwoTowerRetrieval

__version__ = "0.1.0"

__all__ = ["BruteForceIndex", "TwoTowerRetrieval", "datasets", "losses", "__version__"]
