"""`fit` on NumPy arrays: the backend's train function and step against Keras' own.

On TensorFlow and torch `TwoTowerRetrieval.fit` on arrays gathers each batch
from device-resident columns and runs the backend's `train_step`
(`two_tower.models._array_training`, `two_tower.backends`); on JAX it is Keras' own
path. The reference here is Keras' plain path: `keras.Model.train_step` fed the
same batches through a `keras.utils.PyDataset`. Losses and weights must agree
within 1e-5 for every loss. Where ids repeat in a batch, the reference is dense
Adagrad written in NumPy: Keras' TensorFlow step is not (see
`backends/tensorflow.py`, `_summed_gradient`).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest

import two_tower
from two_tower.backends import backend_module
from two_tower.models import _array_training

ROWS, BATCH, TABLE, DIM = 100, 32, 120, 8
LOSSES = ("mse", "softmax", "sampled_softmax", "full_softmax")
FAST = keras.backend.backend() in ("tensorflow", "torch")


class PlainStep(two_tower.TwoTowerRetrieval):
    """The same model trained by Keras' own `train_step`."""

    def train_step(self, *args: Any) -> Any:
        return keras.Model.train_step(self, *args)


class Batches(keras.utils.PyDataset):
    """Given batches, in order: Keras' own input path."""

    def __init__(self, batches: list[Any]) -> None:
        super().__init__()
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Any:
        return self.batches[index]


def _data(loss: str, seed: int = 0, distinct: bool = True) -> tuple[dict[str, Any], Any]:
    """ROWS pairs; with `distinct`, no id repeats within any batch of BATCH rows."""
    rng = np.random.default_rng(seed)
    if distinct:
        queries, candidates = rng.permutation(TABLE)[:ROWS], rng.permutation(TABLE)[:ROWS]
    else:
        queries, candidates = rng.integers(0, 6, ROWS), rng.integers(0, 9, ROWS)
    x = {"query": queries.astype("int32"), "candidate": candidates.astype("int32")}
    y = rng.random(ROWS).astype("float32") if loss == "mse" else None
    return x, y


def _model(
    loss: str, cls: type = two_tower.TwoTowerRetrieval, optimizer: Any = None, **compile_kwargs: Any
) -> Any:
    keras.utils.set_random_seed(7)
    catalogue = {"catalogue_size": TABLE} if loss in ("sampled_softmax", "full_softmax") else {}
    sampled = {"num_sampled_negatives": 5} if loss == "sampled_softmax" else {}
    model = cls(
        keras.Sequential([keras.layers.Embedding(TABLE, DIM), keras.layers.Dense(DIM)]),
        keras.layers.Embedding(TABLE, DIM),
        loss=loss,
        **catalogue,
        **sampled,
    )
    optimizer = optimizer or (lambda: keras.optimizers.Adam(0.05))
    model.compile(optimizer=optimizer(), **compile_kwargs)
    return model


def _pair(loss: str, optimizer: Any = None, **compile_kwargs: Any) -> tuple[Any, Any]:
    """The library's model and a PlainStep with the same weights and optimizer."""
    model = _model(loss, optimizer=optimizer, **compile_kwargs)
    plain = _model(loss, PlainStep, optimizer=optimizer, **compile_kwargs)
    x, _ = _data(loss)
    for each in (model, plain):
        each.predict({"query": x["query"][:2], "candidate": x["candidate"][:2]}, verbose=0)
    plain.set_weights(model.get_weights())
    return model, plain


def _batches(x: dict[str, Any], y: Any, order: Any, sample_weight: Any = None) -> list[Any]:
    batches = []
    for start in range(0, len(order), BATCH):
        rows = order[start : start + BATCH]
        batch_x = {key: value[rows] for key, value in x.items()}
        batch_y = None if y is None else y[rows]
        weights = None if sample_weight is None else sample_weight[rows]
        batches.append(keras.utils.pack_x_y_sample_weight(batch_x, batch_y, weights))
    return batches


def _assert_same_training(model: Any, plain: Any, history: Any, plain_history: Any) -> None:
    np.testing.assert_allclose(
        history.history["loss"], plain_history.history["loss"], rtol=1e-5, atol=1e-6
    )
    for ours, theirs in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert int(model.optimizer.iterations) == int(plain.optimizer.iterations)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("loss", LOSSES)
def test_fit_on_arrays_trains_as_keras_own_step(loss: str, optimizer: str) -> None:
    tensorflow = keras.backend.backend() == "tensorflow"
    if optimizer == "adam" and loss == "sampled_softmax" and tensorflow:
        # Sampled negatives repeat the batch's ids, where Keras' TensorFlow Adam
        # squares each lookup's slice (see the module docstring); SGD covers it.
        pytest.skip("Keras' own TensorFlow step is not dense Adam on repeated ids")
    sgd = lambda: keras.optimizers.SGD(0.5, momentum=0.9)  # noqa: E731
    model, plain = _pair(loss, optimizer=sgd if optimizer == "sgd" else None)
    x, y = _data(loss)
    history = model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    plain_history = plain.fit(
        Batches(_batches(x, y, np.arange(ROWS))), epochs=3, shuffle=False, verbose=0
    )
    _assert_same_training(model, plain, history, plain_history)


def test_shuffled_epochs_are_the_drawn_permutations(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[np.ndarray] = []

    class Recording:
        def __init__(self, shared: object = None) -> None:
            del shared  # (torch: rank 0's seed, under a process group)
            self.random = np.random.default_rng(3)

        def permutation(self, rows: int) -> np.ndarray:
            drawn.append(self.random.permutation(rows))
            return drawn[-1]

    monkeypatch.setattr(_array_training, "random_generator", Recording)
    model, plain = _pair("mse")
    x, y = _data("mse")
    weights = np.linspace(0.5, 2.0, ROWS).astype("float32")
    history = model.fit(x, y, sample_weight=weights, batch_size=BATCH, epochs=3, verbose=0)
    if FAST:
        assert len(drawn) == 3
        for order in drawn:
            assert sorted(order) == list(range(ROWS))
        assert not np.array_equal(drawn[0], drawn[1])
        batches = [b for order in drawn for b in _batches(x, y, order, weights)]
        plain.fit(Batches(batches), epochs=1, shuffle=False, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
        for ours, theirs in zip(model.get_weights(), plain.get_weights(), strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
        assert int(model.optimizer.iterations) == int(plain.optimizer.iterations) == 12
    else:
        assert drawn == []  # JAX: Keras' own input path


def test_sample_weights_and_a_short_last_batch_match_keras() -> None:
    model, plain = _pair("mse")
    x, y = _data("mse")
    weights = np.random.default_rng(1).random(ROWS).astype("float32")
    history = model.fit(
        x, y, sample_weight=weights, batch_size=BATCH, epochs=2, shuffle=False, verbose=0
    )
    plain_history = plain.fit(
        Batches(_batches(x, y, np.arange(ROWS), weights)), epochs=2, shuffle=False, verbose=0
    )
    assert ROWS % BATCH  # the last batch is short
    _assert_same_training(model, plain, history, plain_history)


class Counter(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, int]] = []

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.events.append(("epoch", epoch))

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.events.append(("batch", batch))
        assert set(logs) == {"loss"}

    def on_test_batch_end(self, batch: int, logs: Any = None) -> None:
        self.events.append(("validation batch", batch))


@pytest.mark.parametrize("steps_per_epoch", [None, 2])
def test_callbacks_and_steps_count_as_keras_does(steps_per_epoch: int | None) -> None:
    execution = 1 if keras.backend.backend() == "torch" else 2
    model, plain = _pair("mse", steps_per_execution=execution)
    x, y = _data("mse")
    ours, theirs = Counter(), Counter()
    # The second is Keras' array path on the same arrays, with Keras' own step.
    for each, counter in ((model, ours), (plain, theirs)):
        each.fit(
            x,
            y,
            batch_size=20,
            epochs=3,
            shuffle=False,
            steps_per_epoch=steps_per_epoch,
            callbacks=[counter],
            validation_data=(x, y),
            verbose=0,
        )
    assert ours.events == theirs.events
    # Validation in batches of `batch_size` rows, as Keras cuts them (not its default 32).
    # (5 batches of 20 rows: the last callback's index is at least 4; 3 with 32 rows).
    assert max(index for event, index in ours.events if event == "validation batch") >= 4
    assert int(model.optimizer.iterations) == int(plain.optimizer.iterations)
    for mine, reference in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=1e-6)


def test_validation_progress_bar_and_a_later_keras_path_fit(capsys: pytest.CaptureFixture) -> None:
    model, _ = _pair("mse")
    x, y = _data("mse")
    history = model.fit(x, y, batch_size=BATCH, epochs=2, validation_data=(x, y), verbose=1)
    assert len(history.history["val_loss"]) == 2
    assert "4/4" in capsys.readouterr().out  # ceil(100 / 32) steps per epoch
    # The array path leaves Keras' own train function in place for other inputs.
    if FAST:
        assert model.train_function is None
    model.fit(Batches(_batches(x, y, np.arange(ROWS))), epochs=1, verbose=0)
    keras_own = model.train_function
    assert keras_own is not None
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    assert model.train_function is keras_own
    evaluated = model.evaluate(x, y, batch_size=BATCH, verbose=0)
    assert np.isfinite(evaluated)


def test_recompiling_trains_with_the_new_optimizer() -> None:
    model, plain = _pair("mse")
    x, y = _data("mse")
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    plain.set_weights(model.get_weights())
    plain.compile(optimizer=keras.optimizers.SGD(0.1))
    history = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    plain_history = plain.fit(
        Batches(_batches(x, y, np.arange(ROWS))), epochs=2, shuffle=False, verbose=0
    )
    _assert_same_training(model, plain, history, plain_history)


def test_repeated_ids_train_as_dense_adagrad_on_every_backend() -> None:
    """Adagrad's accumulator gets (g1 + g2)**2 for an id looked up twice, as in NumPy."""
    keras.utils.set_random_seed(7)
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(10, DIM), keras.layers.Embedding(10, DIM), loss="mse"
    )
    model.compile(optimizer=keras.optimizers.Adagrad(0.3, initial_accumulator_value=0.1))
    x, y = _data("mse", distinct=False)
    model.predict({"query": x["query"][:2], "candidate": x["candidate"][:2]}, verbose=0)
    tables = [np.array(w, dtype="float64") for w in model.get_weights()]
    history = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    # NumPy: MSE on dot products, dense gradients, Keras' Adagrad formula.
    accumulators = [np.full_like(t, 0.1) for t in tables]
    for _ in range(2):
        for start in range(0, ROWS, BATCH):
            q, c = x["query"][start : start + BATCH], x["candidate"][start : start + BATCH]
            labels = y[start : start + BATCH].astype("float64")
            queries, candidates = tables[0][q], tables[1][c]
            error = (queries * candidates).sum(axis=1) - labels
            d_scores = 2 * error / len(q)
            gradients = [np.zeros_like(t) for t in tables]
            np.add.at(gradients[0], q, d_scores[:, None] * candidates)
            np.add.at(gradients[1], c, d_scores[:, None] * queries)
            for table, accumulator, gradient in zip(tables, accumulators, gradients, strict=True):
                accumulator += gradient**2
                table -= 0.3 * gradient / np.sqrt(accumulator + 1e-7)
    for ours, expected in zip(model.get_weights(), tables, strict=True):
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(history.history["loss"]))


def test_what_keras_own_path_keeps() -> None:
    """Inputs the array path does not take reach Keras unchanged."""
    model, _ = _pair("mse")
    x, y = _data("mse")
    backend = backend_module()
    for kwargs in (
        {"validation_split": 0.2},
        {"shuffle": "batch"},
        {"class_weight": {0: 1.0}},
    ):
        args, given, function = _array_training.prepare(
            model, (x, y), {"batch_size": BATCH, **kwargs}, backend
        )
        assert function is None and args == (x, y) and given["batch_size"] == BATCH
    args, given, function = _array_training.prepare(model, (x, y), {"batch_size": BATCH}, backend)
    assert (function is not None) == FAST
    if FAST:
        assert args == () and given["y"] is None and given["batch_size"] is None
        history = model.fit(x, y, batch_size=BATCH, validation_split=0.2, epochs=1, verbose=0)
        assert "val_loss" in history.history


class WithActivityLoss(two_tower.TwoTowerRetrieval):
    """A subclass whose own `call` adds a loss (cleared before each step's call)."""

    def call(self, inputs: Any, training: bool = False) -> Any:
        outputs = super().call(inputs, training=training)
        if isinstance(outputs, dict) and "query_embeddings" in outputs:
            self.add_loss(0.01 * keras.ops.mean(keras.ops.square(outputs["query_embeddings"])))
        return outputs


class PlainWithActivityLoss(WithActivityLoss):
    def train_step(self, *args: Any) -> Any:
        return keras.Model.train_step(self, *args)


def test_losses_added_in_a_subclass_call_count_once_per_step() -> None:
    model = _model("softmax", WithActivityLoss)
    plain = _model("softmax", PlainWithActivityLoss)
    x, _ = _data("softmax")
    for each in (model, plain):
        each.predict({"query": x["query"][:2], "candidate": x["candidate"][:2]}, verbose=0)
    plain.set_weights(model.get_weights())
    history = model.fit(x, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    plain_history = plain.fit(
        Batches(_batches(x, None, np.arange(ROWS))), epochs=3, shuffle=False, verbose=0
    )
    _assert_same_training(model, plain, history, plain_history)
