"""The old home of the package's file hashing, kept for `two_tower.retrieval.faiss_index`.

The helper now lives in `two_tower.saving._files`; import it from there.
"""

from two_tower.saving._files import sha256

__all__ = ["sha256"]
