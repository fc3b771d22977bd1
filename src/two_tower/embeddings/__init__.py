"""Embedding layers for open id spaces: hashed and quotient-remainder tables, no vocabulary."""
