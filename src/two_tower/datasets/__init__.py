"""Datasets as plain NumPy dicts of arrays, and sharded logs streamed from disk."""

from two_tower.datasets import movielens, synthetic
from two_tower.datasets.interaction_file import read_interactions
from two_tower.datasets.movielens.tables import MovieLensTables
from two_tower.datasets.sequence_dataset import SequenceDataset
from two_tower.datasets.shard_dataset import ShardDataset

__all__ = [
    "MovieLensTables",
    "SequenceDataset",
    "ShardDataset",
    "movielens",
    "read_interactions",
    "synthetic",
]
