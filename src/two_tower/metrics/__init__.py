"""Keras metrics over the full catalogue."""
