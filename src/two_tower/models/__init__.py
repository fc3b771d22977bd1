"""The retrieval model and the components it orchestrates."""
