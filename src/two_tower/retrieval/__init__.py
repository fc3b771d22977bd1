"""Indexes over embedded candidates: exact top-k search and approximate (faiss)."""

from two_tower.retrieval.candidate_index import CandidateIndex

__all__ = ["CandidateIndex"]
