"""Indexes over embedded candidates: exact top-k search and approximate (faiss)."""
