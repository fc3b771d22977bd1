"""Query and candidate towers: Keras layers that embed features."""
