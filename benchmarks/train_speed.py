"""Training speed: the keras-rs basic retrieval tutorial's own code against the library.

Both train the same model (Embedding(32) towers, MSE on (rating-1)/4,
Adagrad(0.1), batch 1000, 50 epochs) on the same 80,000 MovieLens ratings:
- tutorial: the keras-rs basic retrieval tutorial as written: tfds `movielens/100k-ratings` (built
  offline from the local copy), its tf.data pipeline (map, shuffle, take, batch,
  cache) and its `RetrievalModel` with `keras_rs.layers.BruteForceRetrieval`;
- library: `TwoTowerRetrieval` fed NumPy arrays, with
  `two_tower.defaults.steps_per_execution()` (16 on JAX and TensorFlow; torch
  rejects more than 1).
- floor: the same training written by hand for the backend, with the data on
  the device: JAX one `lax.scan` per epoch, TensorFlow one `tf.function` per
  epoch (a `tf.range` loop), torch a plain eager loop with `torch.optim.Adagrad`.
  No input pipeline, no callbacks, no metrics: no Keras `fit` can beat it.
Protocols per backend:
- warm: in one process, each side is warmed up with one epoch (tracing,
  compilation, the tf.data cache), then timed over 50 epochs, with the tutorial's
  validation every 5 epochs (its `fit` call as written; no floor) and training only;
- cold: each side in a fresh process, timing its first `fit` call (compilation
  and the first pass over the input pipeline included), with validation every 5
  epochs (how ANCHORS.md timed the tutorial: 28.3 s on JAX; no floor) and
  training only (the floor's first 50 epochs, tracing included).
The ratio columns are two_tower / floor and tutorial / two_tower.
Needs TensorFlow and tensorflow-datasets installed beside each backend (for the
tutorial's own code).

    python benchmarks/train_speed.py --backends jax,tensorflow,torch
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import _common

EPOCHS = 50


def tutorial_fit_seconds(
    data_dir: str | None, epochs: int, cold: str | None = None
) -> dict[str, float]:
    """The tutorial's pipeline and model: warm (both protocols) or cold."""
    import keras
    import keras_rs
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from two_tower.datasets import movielens

    tfds_dir = movielens.prime_tfds_cache(os.path.join(tempfile.gettempdir(), "tt_tfds"), data_dir)
    ratings = tfds.load("movielens/100k-ratings", split="train", data_dir=str(tfds_dir))
    movies = tfds.load("movielens/100k-movies", split="train", data_dir=str(tfds_dir))
    users_count = int(
        ratings.map(lambda x: tf.strings.to_number(x["user_id"], out_type=tf.int32))
        .reduce(tf.constant(0, tf.int32), tf.maximum)
        .numpy()
    )
    movies_count = int(movies.cardinality().numpy())  # int(): Keras 3.15 rejects np.int

    def preprocess_rating(x):
        return (
            tf.strings.to_number(x["user_id"], out_type=tf.int32),
            {
                "movie_id": tf.strings.to_number(x["movie_id"], out_type=tf.int32),
                "rating": (x["user_rating"] - 1.0) / 4.0,
            },
        )

    shuffled = ratings.map(preprocess_rating).shuffle(
        100_000, seed=42, reshuffle_each_iteration=False
    )
    train = shuffled.take(80_000).batch(1000).cache()
    test = shuffled.skip(80_000).take(20_000).batch(1000).cache()

    class RetrievalModel(keras.Model):
        def __init__(self, num_users, num_candidates, embedding_dimension=32, **kwargs):
            super().__init__(**kwargs)
            self.user_embedding = keras.layers.Embedding(num_users, embedding_dimension)
            self.candidate_embedding = keras.layers.Embedding(num_candidates, embedding_dimension)
            self.retrieval = keras_rs.layers.BruteForceRetrieval(k=10, return_scores=False)
            self.loss_fn = keras.losses.MeanSquaredError()

        def build(self, input_shape):
            self.user_embedding.build(input_shape)
            self.candidate_embedding.build(input_shape)
            self.retrieval.candidate_embeddings = self.candidate_embedding.embeddings
            self.retrieval.build(input_shape)
            super().build(input_shape)

        def call(self, inputs, training=False):
            user_embeddings = self.user_embedding(inputs)
            result = {"user_embeddings": user_embeddings}
            if not training:
                result["predictions"] = self.retrieval(user_embeddings)
            return result

        def compute_loss(self, x, y, y_pred, sample_weight, training=True):
            candidate_id, rating = y["movie_id"], y["rating"]
            user_embeddings = y_pred["user_embeddings"]
            candidate_embeddings = self.candidate_embedding(candidate_id)
            labels = keras.ops.expand_dims(rating, -1)
            scores = keras.ops.sum(
                keras.ops.multiply(user_embeddings, candidate_embeddings), axis=1, keepdims=True
            )
            return self.loss_fn(labels, scores, sample_weight)

    model = RetrievalModel(users_count + 1, movies_count + 1)
    model.compile(optimizer=keras.optimizers.Adagrad(learning_rate=0.1))
    fit = lambda **kw: model.fit(train, epochs=epochs, verbose=0, **kw)  # noqa: E731
    if cold:
        return _time_cold(fit, test, cold)
    # Warm-up: tracing, compilation, filling the tf.data caches.
    model.fit(train, validation_data=test, validation_freq=1, epochs=1, verbose=0)
    return _time_both(fit, test)


def _time_cold(fit, validation_data, cold: str) -> dict[str, float]:
    """The first `fit` in the process: with validation every 5 epochs, or training only."""
    started = time.perf_counter()
    if cold == "validation":
        fit(validation_data=validation_data, validation_freq=5)
        return {"cold": time.perf_counter() - started}
    fit()
    return {"cold_train_only": time.perf_counter() - started}


def _time_both(fit, validation_data) -> dict[str, float]:
    started = time.perf_counter()
    fit(validation_data=validation_data, validation_freq=5)
    with_validation = time.perf_counter() - started
    started = time.perf_counter()
    fit()
    return {"with_validation": with_validation, "train_only": time.perf_counter() - started}


def library_fit_seconds(
    data_dir: str | None, epochs: int, cold: str | None = None
) -> dict[str, float]:
    """The same configuration on TwoTowerRetrieval with NumPy inputs."""
    import keras

    import two_tower
    from two_tower.datasets import movielens

    ratings = movielens.load_ratings(data_dir)
    records = {
        "query": ratings["user_id"].astype("int32"),
        "candidate": ratings["movie_id"].astype("int32"),
        "rating": (ratings["user_rating"] - 1.0) / 4.0,
    }
    train, test = movielens.random_split(records, test_fraction=0.2, seed=42)
    model = two_tower.TwoTowerRetrieval(
        keras.layers.Embedding(944, 32), keras.layers.Embedding(1683, 32), loss="mse"
    )
    model.compile(
        optimizer=keras.optimizers.Adagrad(learning_rate=0.1),
        steps_per_execution=two_tower.defaults.steps_per_execution(),
    )
    x = {"query": train["query"], "candidate": train["candidate"]}
    validation = ({"query": test["query"], "candidate": test["candidate"]}, test["rating"])

    def fit(**kw):
        return model.fit(x, train["rating"], batch_size=1000, epochs=epochs, verbose=0, **kw)

    if cold:
        return _time_cold(fit, validation, cold)
    model.fit(  # warm-up: tracing and compilation of the train and test steps
        x, train["rating"], batch_size=1000, epochs=1, verbose=0, validation_data=validation
    )
    return _time_both(
        lambda **kw: model.fit(x, train["rating"], batch_size=1000, epochs=epochs, verbose=0, **kw),
        validation,
    )


def jax_floor_seconds(data_dir: str | None, epochs: int, cold: bool = False) -> float:
    """The same training written by hand in JAX: one `lax.scan` per epoch.

    All data on the device, one `lax.scan` over each epoch's 80 batches, Keras'
    Adagrad update (accumulator 0.1, epsilon 1e-7) and MSE: no input pipeline,
    no callbacks, no per-step Python. `cold` times the first `epochs` epochs,
    compilation included; otherwise they follow a warm-up epoch.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    train, batches = _floor_data(data_dir)
    started = time.perf_counter()
    rng = np.random.default_rng(42)
    tables = (
        jnp.asarray(rng.uniform(-0.05, 0.05, (944, 32)), jnp.float32),
        jnp.asarray(rng.uniform(-0.05, 0.05, (1683, 32)), jnp.float32),
    )
    state = (tables, tuple(jnp.full_like(t, 0.1) for t in tables))
    data = tuple(jnp.asarray(train[key]) for key in ("query", "candidate", "rating"))

    def loss(params, users, movies, labels):
        scores = jnp.sum(params[0][users] * params[1][movies], axis=-1)
        return jnp.mean(jnp.square(labels - scores))

    def step(carry, batch):
        params, accumulators = carry
        grads = jax.grad(loss)(params, *batch)
        accumulators = tuple(a + g * g for a, g in zip(accumulators, grads, strict=True))
        params = tuple(
            p - 0.1 * g / jnp.sqrt(a + 1e-7)
            for p, g, a in zip(params, grads, accumulators, strict=True)
        )
        return (params, accumulators), None

    @jax.jit
    def epoch(carry, order):
        shuffled = tuple(column[order].reshape(batches, 1000) for column in data)
        return jax.lax.scan(step, carry, shuffled)[0]

    orders = [jnp.asarray(rng.permutation(batches * 1000)) for _ in range(epochs + 1)]
    if not cold:
        state = jax.block_until_ready(epoch(state, orders[0]))
        started = time.perf_counter()
    for order in orders[1:]:
        state = epoch(state, order)
    jax.block_until_ready(state)
    return time.perf_counter() - started


def _floor_data(data_dir: str | None) -> tuple[dict, int]:
    """The library's 80,000 training ratings, whole batches of 1000 only."""
    from two_tower.datasets import movielens

    ratings = movielens.load_ratings(data_dir)
    records = {
        "query": ratings["user_id"].astype("int32"),
        "candidate": ratings["movie_id"].astype("int32"),
        "rating": ((ratings["user_rating"] - 1.0) / 4.0).astype("float32"),
    }
    train, _ = movielens.random_split(records, test_fraction=0.2, seed=42)
    batches = len(train["rating"]) // 1000
    return {key: train[key][: batches * 1000] for key in train}, batches


def tensorflow_floor_seconds(data_dir: str | None, epochs: int, cold: bool = False) -> float:
    """The same training written by hand in TensorFlow: one `tf.function` per epoch.

    The columns on the device, a `tf.range` loop over the epoch's batches (a
    `tf.while_loop`), dense gradients and Keras' Adagrad formula (accumulator
    0.1, epsilon 1e-7). `cold` times the first `epochs` epochs, tracing
    included; otherwise they follow a warm-up epoch.
    """
    import numpy as np
    import tensorflow as tf

    data, batches = _floor_data(data_dir)
    started = time.perf_counter()
    rng = np.random.default_rng(42)
    columns = [tf.constant(data[key]) for key in ("query", "candidate", "rating")]
    tables = [
        tf.Variable(rng.uniform(-0.05, 0.05, shape).astype("float32"))
        for shape in ((944, 32), (1683, 32))
    ]
    accumulators = [tf.Variable(tf.fill(table.shape, 0.1)) for table in tables]

    @tf.function
    def epoch(order: tf.Tensor) -> None:
        for i in tf.range(batches):
            rows = order[i * 1000 : (i + 1) * 1000]
            users, movies, labels = (tf.gather(column, rows) for column in columns)
            with tf.GradientTape() as tape:
                scores = tf.reduce_sum(
                    tf.gather(tables[0], users) * tf.gather(tables[1], movies), axis=1
                )
                loss = tf.reduce_mean(tf.square(labels - scores))
            gradients = [tf.convert_to_tensor(g) for g in tape.gradient(loss, tables)]
            for table, accumulator, gradient in zip(tables, accumulators, gradients, strict=True):
                accumulator.assign_add(gradient * gradient)
                table.assign_sub(0.1 * gradient / tf.sqrt(accumulator + 1e-7))

    def order() -> tf.Tensor:
        return tf.constant(rng.permutation(batches * 1000))

    if not cold:
        epoch(order())
        started = time.perf_counter()
    for _ in range(epochs):
        epoch(order())
    tables[0].numpy()
    return time.perf_counter() - started


def torch_floor_seconds(data_dir: str | None, epochs: int, cold: bool = False) -> float:
    """The same training written by hand in torch: a plain eager loop.

    The columns as tensors, `torch.randperm` per epoch, two `nn.Embedding`
    tables, MSE, `torch.optim.Adagrad` (accumulator 0.1, epsilon 1e-7). `cold`
    times the first `epochs` epochs; otherwise they follow a warm-up epoch.
    """
    import torch

    data, batches = _floor_data(data_dir)
    started = time.perf_counter()
    users, movies, labels = (
        torch.from_numpy(data[key]) for key in ("query", "candidate", "rating")
    )
    users, movies = users.long(), movies.long()
    tables = [torch.nn.Embedding(944, 32), torch.nn.Embedding(1683, 32)]
    for table in tables:
        torch.nn.init.uniform_(table.weight, -0.05, 0.05)
    optimizer = torch.optim.Adagrad(
        [table.weight for table in tables], lr=0.1, initial_accumulator_value=0.1, eps=1e-7
    )

    def epoch() -> None:
        order = torch.randperm(batches * 1000)
        for start in range(0, batches * 1000, 1000):
            rows = order[start : start + 1000]
            optimizer.zero_grad(set_to_none=True)
            scores = (tables[0](users[rows]) * tables[1](movies[rows])).sum(dim=1)
            loss = (labels[rows] - scores).pow(2).mean()
            loss.backward()
            optimizer.step()

    if not cold:
        epoch()
        started = time.perf_counter()
    for _ in range(epochs):
        epoch()
    return time.perf_counter() - started


COLD = ("validation", "train")
FLOORS = {
    "jax": ("jax.lax.scan", jax_floor_seconds),
    "tensorflow": ("tf.function", tensorflow_floor_seconds),
    "torch": ("eager torch", torch_floor_seconds),
}


def main(argv: list[str] | None = None) -> None:
    parser = _common.argument_parser(__doc__)
    _common.add_backends_argument(parser)
    _common.add_data_dir_argument(parser)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="warm", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _common.report(_worker(args))
        return

    print(f"fit time for {args.epochs} epochs (see the docstring for the protocols)")
    print("| backend | protocol | keras-rs tutorial (tf.data + keras-rs) | two_tower (NumPy) "
          "| floor | two_tower / floor | tutorial / two_tower |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for backend in args.backends.split(","):
        times: dict[str, dict[str, float]] = {"tutorial": {}, "library": {}, "floor": {}}
        modes = ["warm", "floor-cold"]
        modes += [f"{side}-cold-{cold}" for side in ("tutorial", "library") for cold in COLD]
        for mode in modes:
            for side, figures in _run_worker(backend, mode, args).items():
                times[side].update(figures)
        for protocol, label in (
            ("with_validation", "warm, validation every 5 epochs"),
            ("train_only", "warm, training only"),
            ("cold", "cold, validation every 5 epochs"),
            ("cold_train_only", "cold, training only"),
        ):
            tutorial, library = times["tutorial"][protocol], times["library"][protocol]
            floor = times["floor"].get(protocol)
            floor_text = "" if floor is None else f"{floor:.1f} s ({FLOORS[backend][0]})"
            ratio = "" if floor is None else f"{library / floor:.2f}x"
            print(
                f"| {backend} | {label} | {tutorial:.1f} s | {library:.1f} s | {floor_text} "
                f"| {ratio} | {tutorial / library:.1f}x |",
                flush=True,
            )


def _worker(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    _common.use_backend(args.worker)
    import keras

    keras.utils.set_random_seed(42)
    floor = FLOORS[args.worker][1]
    if args.mode == "warm":
        return {
            "tutorial": tutorial_fit_seconds(args.data_dir, args.epochs),
            "library": library_fit_seconds(args.data_dir, args.epochs),
            "floor": {"train_only": floor(args.data_dir, args.epochs)},
        }
    if args.mode == "floor-cold":
        return {"floor": {"cold_train_only": floor(args.data_dir, args.epochs, cold=True)}}
    side, _, cold = args.mode.split("-")
    fit_seconds = tutorial_fit_seconds if side == "tutorial" else library_fit_seconds
    return {side: fit_seconds(args.data_dir, args.epochs, cold=cold)}


def _run_worker(backend: str, mode: str, args: argparse.Namespace) -> dict:
    arguments = ["--worker", backend, "--mode", mode, "--epochs", str(args.epochs)]
    if args.data_dir:
        arguments += ["--data-dir", args.data_dir]
    return _common.worker_result(__file__, arguments, f"{backend} ({mode})")


if __name__ == "__main__":
    main()
