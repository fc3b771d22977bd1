"""The catalogue's candidate features, for a candidate tower over dict features."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from two_tower.towers.tower_ids import declares_ids


class Catalogue:
    """Row i of each feature describes candidate id i, kept as non-trainable variables.

    The catalogue losses (`"full_softmax"`, `"sampled_softmax"`) and `FactorizedTopK`
    metrics embed every candidate id; a candidate tower over ids gets
    `arange(catalogue_size)`, one over a dict of features gets these rows
    (`TwoTowerRetrieval.set_catalogue`). The variables are the model's (made with
    its `add_weight`), so they are saved with it and live on the device.

    Args:
        add_weight: the model's `add_weight`.
        catalogue_size: the number of candidate ids, or None (then nothing can be set).
        candidate_id_key: the candidate id feature of the dict, if any.
        candidate_tower: the tower whose declared ranges the rows must respect.
    """

    def __init__(
        self,
        add_weight: Callable[..., keras.Variable],
        catalogue_size: int | None,
        candidate_id_key: str | None,
        candidate_tower: keras.layers.Layer,
    ) -> None:
        self._add_weight = add_weight
        self.catalogue_size = catalogue_size
        self.candidate_id_key = candidate_id_key
        self.candidate_tower = candidate_tower
        self.variables: dict[str, keras.Variable] = {}

    def __bool__(self) -> bool:
        return bool(self.variables)

    def set(self, features: Any) -> bool:
        """Checks `features` and stores them; True when the variables were created now
        (compiled steps traced before do not read them)."""
        arrays = self._checked(features)
        if self.variables:
            expected = {n: (tuple(v.shape), v.dtype) for n, v in self.variables.items()}
            received = {n: (a.shape, str(a.dtype)) for n, a in arrays.items()}
            if expected != received:
                raise ValueError(
                    "set_catalogue can only replace the values of the catalogue it "
                    f"holds: expected (shape, dtype) {expected}, received {received}"
                )
            for name, array in arrays.items():
                self.variables[name].assign(array)
            return False
        self.create({n: (str(a.dtype), a.shape) for n, a in arrays.items()})
        for name, array in arrays.items():
            self.variables[name].assign(array)
        return True

    def create(self, specs: Mapping[str, tuple[str, Sequence[int]]]) -> None:
        """Makes the variables (zeros) of `specs`: name -> (dtype, shape)."""
        self.variables = {
            name: self._add_weight(
                shape=tuple(shape),
                dtype=dtype,
                initializer=keras.initializers.Constant(0),
                trainable=False,
                name=f"catalogue_{name}",
            )
            for name, (dtype, shape) in specs.items()
        }

    def spec(self) -> dict[str, list[Any]]:
        """name -> [dtype, shape], for the model's build config."""
        return {name: [v.dtype, list(v.shape)] for name, v in self.variables.items()}

    def tower_inputs(self, candidate_features: Any, loss: str) -> Any:
        """The whole catalogue's candidate-tower inputs, row i for candidate id i."""
        if self.variables:
            return {name: variable.value for name, variable in self.variables.items()}
        if isinstance(candidate_features, Mapping):
            raise ValueError(
                f"loss={loss!r} and FactorizedTopK metrics embed the whole "
                "catalogue with the candidate tower, which takes dict features "
                f"{sorted(candidate_features)}. Call `set_catalogue(features)` first, "
                "with row i holding the features of candidate id i."
            )
        assert self.catalogue_size is not None
        return ops.arange(self.catalogue_size, dtype="int32")

    def takes_rows(self, features: Any) -> bool:
        """Whether `features` are ids (not a dict) that stand for their catalogue rows."""
        return (
            bool(self.variables)
            and self.candidate_id_key in self.variables
            and not isinstance(features, Mapping)
        )

    def rows(self, positions: Any) -> dict[str, np.ndarray]:
        """The rows at `positions`, gathered on the device: O(len(positions))."""
        return {
            name: ops.convert_to_numpy(ops.take(variable.value, positions, axis=0))
            for name, variable in self.variables.items()
        }

    def values(self, known: slice) -> dict[str, np.ndarray]:
        """The rows in `known`, on the host."""
        return {
            name: ops.convert_to_numpy(variable.value)[known]
            for name, variable in self.variables.items()
        }

    def _checked(self, features: Any) -> dict[str, np.ndarray]:
        """`features` as int32 / float32 arrays, once checked.

        A non-empty dict of `catalogue_size`-row numeric arrays, within the
        candidate tower's declared ranges, whose `candidate_id_key` feature is
        `arange`.
        """
        size = self.catalogue_size
        assert size is not None  # set_catalogue checked it
        if not isinstance(features, Mapping) or not features:
            raise ValueError(
                "`features` must be a non-empty dict of arrays, one row per candidate "
                f"id. Received {type(features).__name__}"
            )
        arrays: dict[str, np.ndarray] = {}
        for name, raw in features.items():
            array = np.asarray(raw)
            if array.dtype.kind in "iu":
                array = array.astype("int32")
            elif array.dtype.kind == "f":
                array = array.astype("float32")
            else:
                raise ValueError(
                    f"Catalogue feature {name!r} must hold integers (indices, e.g. from "
                    f"two_tower.Vocabulary) or floats. Received dtype {array.dtype}"
                )
            if array.ndim == 0 or array.shape[0] != size:
                raise ValueError(
                    f"Catalogue feature {name!r} must have catalogue_size={size} rows "
                    f"(row i is candidate id i). Received shape {array.shape}"
                )
            arrays[name] = array
        declared = declares_ids(self.candidate_tower)
        if declared is not None:
            declared.check_feature_ranges(arrays, "the catalogue features")
        key = self.candidate_id_key
        ids = arrays.get(key) if key is not None else None
        if ids is not None and not np.array_equal(ids, np.arange(size)):
            raise ValueError(
                f"Row i of the catalogue must describe candidate id i, so feature "
                f"{key!r} (the candidate_id_key) must be arange({size})."
            )
        return arrays
