"""Backend-specific machinery, chosen once from `keras.backend.backend()`.

Each module here speaks to one backend's own engine and is imported lazily, only
by the process that runs on that backend. Library code elsewhere calls
`backend_module()` and never imports a backend itself.

Every module provides the hooks of `two_tower.backends._protocol.BackendModule`
(a `typing.Protocol`; `_conformance.py` makes mypy check each module against it).
A hook with nothing to do on a backend is the no-op of `_defaults.py`, re-exported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:  # importing this package must not import Keras (see `_installed`)
    from two_tower.backends._protocol import BackendModule

_MODULES = {
    "jax": "two_tower.backends.jax",
    "tensorflow": "two_tower.backends.tensorflow",
    "torch": "two_tower.backends.torch",
}


def backend_module() -> BackendModule:
    """The module of the backend Keras runs on.

    Raises:
        NotImplementedError: on a backend two_tower does not support (e.g. numpy).
    """
    import keras  # not at import time: `_installed` must run before Keras is imported

    backend = keras.backend.backend()
    if backend not in _MODULES:
        raise NotImplementedError(
            f"two_tower supports the jax, tensorflow and torch backends. Keras runs on "
            f"{backend!r}; set KERAS_BACKEND to one of {sorted(_MODULES)}."
        )
    return cast("BackendModule", importlib.import_module(_MODULES[backend]))
