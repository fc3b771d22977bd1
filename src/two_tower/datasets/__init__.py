"""Datasets as plain NumPy dicts of arrays."""

from two_tower.datasets import movielens, synthetic

__all__ = ["movielens", "synthetic"]
