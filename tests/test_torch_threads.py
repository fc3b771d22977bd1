"""torch on a shared CPU: what `fit` on arrays does with torch's threads.

Every torch operator large enough for ATen to run in parallel starts an OpenMP
parallel region, whose closing barrier waits for all of torch's threads; on a
CPU busy with other work that costs up to a scheduler slice per region
(`benchmarks/torch_contention.py`, docs/backends.md "PyTorch on a shared CPU").
So the array path's batch gather runs on the calling thread on the CPU, and
`fit` never changes the user's thread settings.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest

import two_tower

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="torch's OpenMP thread pool and the torch array path exist on the torch backend only",
)


def _fit_model() -> Any:
    model = two_tower.TwoTowerRetrieval(
        keras.Sequential([keras.layers.Embedding(50, 4), keras.layers.Dense(4)]),
        keras.layers.Embedding(60, 4),
        loss="softmax",
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    return model


@pytest.mark.parametrize("threads", [1, 2])
def test_fit_leaves_the_torch_thread_settings_as_the_user_set_them(threads: int) -> None:
    import torch

    before = torch.get_num_threads()
    interop = torch.get_num_interop_threads()
    torch.set_num_threads(threads)
    try:
        rng = np.random.default_rng(0)
        x = {"query": rng.integers(0, 50, 64), "candidate": rng.integers(0, 60, 64)}
        seen = []

        class Threads(keras.callbacks.Callback):
            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                seen.append(torch.get_num_threads())

        _fit_model().fit(x, batch_size=16, epochs=2, verbose=0, callbacks=[Threads()])
        assert seen == [threads] * 8
        assert torch.get_num_threads() == threads
        assert torch.get_num_interop_threads() == interop
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", ["int64", "int32", "float32", "bool"])
def test_cpu_batches_are_gathered_by_numpy_without_a_torch_operator(dtype: str) -> None:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from two_tower.backends import torch as torch_backend

    rng = np.random.default_rng(1)
    # 1000 rows of 50 is over ATen's 32,768-element grain: index_select would go parallel.
    array = rng.integers(0, 7, (3000, 50)).astype(dtype)
    column = keras.ops.convert_to_tensor(array)
    rows = rng.permutation(3000)[:1000]
    operators: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            operators.append(str(func))
            return func(*args, **(kwargs or {}))

    take = torch_backend._row_taker(column)
    with Record():
        batch = take(rows)
    # `torch.from_numpy` reports `lift_fresh`, which wraps the array and computes nothing.
    assert set(operators) <= {"aten.lift_fresh.default"}, operators
    assert isinstance(batch, torch.Tensor) and batch.dtype == column.dtype
    assert tuple(batch.shape) == (1000, 50)
    np.testing.assert_array_equal(batch.numpy(), array[rows])
    column.zero_()  # the batch is a copy, not a view of the column
    np.testing.assert_array_equal(batch.numpy(), array[rows])


def test_a_column_numpy_cannot_hold_is_gathered_by_torch() -> None:
    import torch

    from two_tower.backends import torch as torch_backend

    values = np.arange(12, dtype="float32").reshape(6, 2)
    column = torch.from_numpy(values).to(torch.bfloat16)  # small integers: exact in bfloat16
    rows = np.array([4, 0, 4])
    batch = torch_backend._row_taker(column)(rows)
    assert batch.dtype == torch.bfloat16
    np.testing.assert_array_equal(batch.float().numpy(), values[rows])


class _Threads(keras.callbacks.Callback):
    """Records the thread each batch end runs on; safe for Keras' thread pool."""

    async_safe = True

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        import threading

        self.threads.add(threading.get_ident())

    def on_test_batch_end(self, batch: int, logs: Any = None) -> None:
        self.on_train_batch_end(batch, logs)


@pytest.mark.parametrize("how", ["fit", "evaluate"])
def test_batch_ends_run_on_the_training_thread(how: str) -> None:
    # Keras would hand them to its thread pool (a GIL handoff each step, which a
    # busy CPU makes wait for the scheduler), for nothing: a torch step is done
    # when it returns.
    import threading

    model = _fit_model()
    x = {"query": np.arange(64) % 50, "candidate": np.arange(64) % 60}
    threads = _Threads()
    if how == "fit":
        model.fit(x, batch_size=16, epochs=1, verbose=0, callbacks=[threads])
    else:
        model.evaluate(x, batch_size=16, verbose=0, callbacks=[threads])
    assert threads.threads == {threading.get_ident()}
