"""Datasets as plain NumPy dicts of arrays."""

from two_tower.datasets import movielens

__all__ = ["movielens"]
