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

`--config realistic` measures a production-sized configuration instead (issue 37):
batch 4,096; a 10^6-row item table and a 10^5-row user table, both
`two_tower.SparseEmbedding`; embedding dim 64; each tower the table, then
`Dense(128, relu)`, then `Dense(64)`; in-batch softmax (`loss="softmax"`, the
default temperature 1) with the logQ correction from
`x["candidate_sampling_probability"]`; `keras.optimizers.Adagrad(0.1)` (Keras'
initial accumulator 0.1 and epsilon 1e-7). The data are synthetic: `--steps`
batches (40 by default) of uniform user ids and Zipf item ids (exponent 1, the
popular ids scattered over the table), each item's true probability fed as its
sampling probability. Each side runs in its own process (so each has its own
peak RSS):
- fit: `TwoTowerRetrieval` fed the NumPy arrays, `shuffle=True`,
  `two_tower.defaults.steps_per_execution()`;
- floor: the same model and update written by hand, with row-sparse table
  updates and the data on the device. Logits are `q c^T - log q` (dividing by
  the temperature 1 is the identity, and the library skips it too); each loss
  is the fastest measured formulation of the same softmax on its backend.
  JAX: one jitted `lax.scan` per epoch (state donated) over a step that
  differentiates by the gathered rows, sums duplicate ids with a sorted segment
  sum and scatters the rows of each table and its accumulator; loss
  `logsumexp - diagonal`. TensorFlow: one `tf.function` per epoch (a `tf.range`
  loop) with `tf.GradientTape`, whose `IndexedSlices` gradients are summed per
  unique id (`tf.unique`) and scattered back with Keras' Adagrad formula; loss
  `reduce_logsumexp - diag_part` (`sparse_softmax_cross_entropy_with_logits`
  was slower). torch: an eager loop over `nn.Embedding(sparse=True)` tables,
  `nn.Linear` layers, `F.cross_entropy` (its fused log-softmax is faster than
  `logsumexp - diagonal`) and `torch.optim.Adagrad`, which sums duplicate ids
  itself (its epsilon sits outside the square root, Keras' inside: the same
  cost).
Warm protocol: one epoch first (compilation included: reported as "first
epoch"), then `--repeats` timed epochs; the best is reported in ms per step, and
each timed epoch below the table with the process' CPU time per step (user +
system: a check on a shared machine, where waiting for cores inflates the
wall-clock only).
Each fit epoch is its own `fit(epochs=1)` call, its set-up included. The goal is
fit / floor <= 1.3 on every backend. A worker runs with the interpreter that runs
this script, so run each backend with its own environment's interpreter, e.g.

    KERAS_BACKEND=torch .nox/tests-torch/bin/python benchmarks/train_speed.py \\
        --config realistic --backends torch
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from collections.abc import Callable
from typing import Any

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


# ------------------------------------------------------- realistic configuration
REALISTIC_BATCH = 4096
REALISTIC_ITEMS = 1_000_000
REALISTIC_USERS = 100_000
REALISTIC_DIM = 64
REALISTIC_HIDDEN = 128
REALISTIC_STEPS = 40
REALISTIC_REPEATS = 2
REALISTIC_LEARNING_RATE = 0.1
ZIPF_EXPONENT = 1.0
ADAGRAD_INITIAL = 0.1  # Keras' `initial_accumulator_value`
ADAGRAD_EPSILON = 1e-7  # Keras' `epsilon`


def realistic_data(steps: int) -> dict[str, Any]:
    """`steps` batches of synthetic interactions: uniform users, Zipf items, true logQ.

    Returns:
        `{"query", "candidate", "candidate_sampling_probability"}`: int32 ids
        and each row's item probability (float32), `steps * REALISTIC_BATCH` rows.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    weights = np.arange(1, REALISTIC_ITEMS + 1, dtype="float64") ** -ZIPF_EXPONENT
    # Popularity rank -> id by a permutation: the popular rows are spread over the table.
    probability = (weights / weights.sum())[rng.permutation(REALISTIC_ITEMS)]
    rows = steps * REALISTIC_BATCH
    items = rng.choice(REALISTIC_ITEMS, size=rows, p=probability).astype("int32")
    return {
        "query": rng.integers(0, REALISTIC_USERS, rows).astype("int32"),
        "candidate": items,
        "candidate_sampling_probability": probability[items].astype("float32"),
    }


def _timed(epoch: Callable[[], None]) -> tuple[float, float]:
    """Runs one epoch: its wall-clock and its CPU seconds (this process, user + system)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    epoch()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu


def _figures(epoch: Callable[[], None], steps: int, repeats: int) -> dict[str, Any]:
    """A side's figures: its first epoch (s, compilation included), then `repeats`
    timed epochs (ms/step: the best, and each with its CPU time), and peak RSS."""
    first, _ = _timed(epoch)
    timed = [_timed(epoch) for _ in range(repeats)]
    return {
        "first_epoch_s": first,
        "ms_per_step": 1000 * min(wall for wall, _ in timed) / steps,
        "epochs": [(1000 * wall / steps, 1000 * cpu / steps) for wall, cpu in timed],
        "peak_rss_mib": _common.peak_rss_kib() / 1024,
    }


def library_realistic(steps: int, repeats: int) -> dict[str, Any]:
    """`TwoTowerRetrieval.fit` on the realistic configuration: first epoch, then timed ones."""
    import keras

    import two_tower

    def tower(rows: int) -> keras.Sequential:
        return keras.Sequential(
            [
                two_tower.SparseEmbedding(rows, REALISTIC_DIM),
                keras.layers.Dense(REALISTIC_HIDDEN, activation="relu"),
                keras.layers.Dense(REALISTIC_DIM),
            ]
        )

    x = realistic_data(steps)
    model = two_tower.TwoTowerRetrieval(
        tower(REALISTIC_USERS), tower(REALISTIC_ITEMS), loss="softmax"
    )
    model.compile(
        optimizer=keras.optimizers.Adagrad(learning_rate=REALISTIC_LEARNING_RATE),
        steps_per_execution=two_tower.defaults.steps_per_execution(),
    )
    table = model.candidate_tower.layers[0]

    def epoch() -> None:
        model.fit(x, batch_size=REALISTIC_BATCH, epochs=1, verbose=0, shuffle=True)
        keras.ops.convert_to_numpy(table.embeddings.value[:1])  # the last step is done

    return _figures(epoch, steps, repeats)


def _glorot(rng: Any, fan_in: int, fan_out: int) -> Any:
    """Keras' `glorot_uniform` for a `[fan_in, fan_out]` kernel, as float32 NumPy."""
    limit = (6 / (fan_in + fan_out)) ** 0.5
    return rng.uniform(-limit, limit, (fan_in, fan_out)).astype("float32")


def _realistic_initial_values() -> dict[str, Any]:
    """The hand-written floors' initial values (NumPy): the tables as Keras'
    `uniform` initializer, the Dense layers as Keras' (glorot kernels, zero biases)."""
    import numpy as np

    rng = np.random.default_rng(42)

    def table(rows: int) -> Any:
        # Uniform in [-0.05, 0.05), drawn as float32 and scaled in place: no
        # float64 or temporary copy of 10^6 rows in the floors' peak RSS.
        values = rng.random((rows, REALISTIC_DIM), dtype="float32")
        values *= 0.1
        values -= 0.05
        return values

    def dense() -> list[Any]:
        return [
            _glorot(rng, REALISTIC_DIM, REALISTIC_HIDDEN),
            np.zeros(REALISTIC_HIDDEN, "float32"),
            _glorot(rng, REALISTIC_HIDDEN, REALISTIC_DIM),
            np.zeros(REALISTIC_DIM, "float32"),
        ]

    return {
        "tables": [table(REALISTIC_USERS), table(REALISTIC_ITEMS)],
        "dense": dense() + dense(),  # the query tower's four, then the candidate tower's
    }


def jax_realistic_floor(steps: int, repeats: int) -> dict[str, Any]:
    """The realistic step by hand in JAX: one jitted `lax.scan` per epoch, state donated.

    Each step gathers the batch's rows, differentiates by those rows (the tables
    are not arguments of the differentiated loss), sums the gradients of
    duplicate ids (sorted segment sum) and scatters the new rows of each table
    and its accumulator; the Dense layers get dense Adagrad.
    """
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    data = realistic_data(steps)
    columns = tuple(
        jnp.asarray(data[key]) for key in ("query", "candidate", "candidate_sampling_probability")
    )
    initial = _realistic_initial_values()
    tables = tuple(jnp.asarray(table) for table in initial["tables"])
    dense = tuple(jnp.asarray(value) for value in initial["dense"])
    state = (
        tables,
        tuple(jnp.full_like(table, ADAGRAD_INITIAL) for table in tables),
        dense,
        tuple(jnp.full_like(value, ADAGRAD_INITIAL) for value in dense),
    )

    def tower(weights: Any, rows: Any) -> Any:
        kernel_1, bias_1, kernel_2, bias_2 = weights
        return jax.nn.relu(rows @ kernel_1 + bias_1) @ kernel_2 + bias_2

    def loss(dense: Any, user_rows: Any, item_rows: Any, log_q: Any) -> Any:
        queries, candidates = tower(dense[:4], user_rows), tower(dense[4:], item_rows)
        logits = queries @ candidates.T - log_q[None, :]
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits))

    def sparse_adagrad(table: Any, accumulator: Any, ids: Any, gradients: Any) -> Any:
        order = jnp.argsort(ids)
        ids = ids[order]
        starts = jnp.concatenate([jnp.ones(1, "int32"), (ids[1:] != ids[:-1]).astype("int32")])
        segments = jnp.cumsum(starts) - 1
        sums = jax.ops.segment_sum(gradients[order], segments, num_segments=ids.shape[0])
        gradients = sums[segments]  # every duplicate carries its id's total
        accumulated = accumulator[ids] + gradients * gradients
        rows = table[ids] - REALISTIC_LEARNING_RATE * gradients / jnp.sqrt(
            accumulated + ADAGRAD_EPSILON
        )
        return table.at[ids].set(rows), accumulator.at[ids].set(accumulated)

    def step(state: Any, batch: Any) -> Any:
        tables, table_accumulators, dense, dense_accumulators = state
        users, items, probability = batch
        gradients = jax.grad(loss, argnums=(0, 1, 2))(
            dense, tables[0][users], tables[1][items], jnp.log(probability)
        )
        dense_gradients, row_gradients = gradients[0], gradients[1:]
        updated = [
            sparse_adagrad(*arguments)
            for arguments in zip(
                tables, table_accumulators, (users, items), row_gradients, strict=True
            )
        ]
        dense_accumulators = tuple(
            a + g * g for a, g in zip(dense_accumulators, dense_gradients, strict=True)
        )
        dense = tuple(
            w - REALISTIC_LEARNING_RATE * g / jnp.sqrt(a + ADAGRAD_EPSILON)
            for w, g, a in zip(dense, dense_gradients, dense_accumulators, strict=True)
        )
        new_tables = tuple(table for table, _ in updated)
        new_accumulators = tuple(accumulator for _, accumulator in updated)
        return (new_tables, new_accumulators, dense, dense_accumulators), None

    @functools.partial(jax.jit, donate_argnums=0)
    def epoch(state: Any, columns: Any, order: Any) -> Any:
        batches = tuple(
            column[order].reshape(steps, REALISTIC_BATCH, *column.shape[1:]) for column in columns
        )
        return jax.lax.scan(step, state, batches)[0]

    rng = np.random.default_rng(1)

    def one_epoch() -> None:
        nonlocal state
        order = jnp.asarray(rng.permutation(steps * REALISTIC_BATCH))
        state = jax.block_until_ready(epoch(state, columns, order))

    return _figures(one_epoch, steps, repeats)


def tensorflow_realistic_floor(steps: int, repeats: int) -> dict[str, Any]:
    """The realistic step by hand in TensorFlow: one `tf.function` per epoch.

    A `tf.range` loop over the epoch's batches; the tape's gradients by the
    tables are `IndexedSlices` (one slice per lookup), summed per unique id and
    applied with Keras' Adagrad formula to those rows of the table and its
    accumulator (`scatter_update`); the Dense layers get dense Adagrad.
    """
    import numpy as np
    import tensorflow as tf

    data = realistic_data(steps)
    columns = [
        tf.constant(data[key]) for key in ("query", "candidate", "candidate_sampling_probability")
    ]
    initial = _realistic_initial_values()
    tables = [tf.Variable(table) for table in initial["tables"]]
    dense = [tf.Variable(value) for value in initial["dense"]]
    table_accumulators = [tf.Variable(tf.fill(t.shape, ADAGRAD_INITIAL)) for t in tables]
    dense_accumulators = [tf.Variable(tf.fill(v.shape, ADAGRAD_INITIAL)) for v in dense]

    def tower(weights: list[tf.Variable], rows: tf.Tensor) -> tf.Tensor:
        kernel_1, bias_1, kernel_2, bias_2 = weights
        return tf.nn.relu(rows @ kernel_1 + bias_1) @ kernel_2 + bias_2

    def sparse_adagrad(
        table: tf.Variable, accumulator: tf.Variable, gradient: tf.IndexedSlices
    ) -> None:
        ids, positions = tf.unique(gradient.indices)
        summed = tf.math.unsorted_segment_sum(gradient.values, positions, tf.shape(ids)[0])
        accumulated = tf.gather(accumulator, ids) + summed * summed
        accumulator.scatter_update(tf.IndexedSlices(accumulated, ids))
        rows = tf.gather(table, ids) - REALISTIC_LEARNING_RATE * summed / tf.sqrt(
            accumulated + ADAGRAD_EPSILON
        )
        table.scatter_update(tf.IndexedSlices(rows, ids))

    @tf.function
    def epoch(order: tf.Tensor) -> None:
        for i in tf.range(steps):
            rows = order[i * REALISTIC_BATCH : (i + 1) * REALISTIC_BATCH]
            users, items, probability = (tf.gather(column, rows) for column in columns)
            with tf.GradientTape() as tape:
                queries = tower(dense[:4], tf.gather(tables[0], users))
                candidates = tower(dense[4:], tf.gather(tables[1], items))
                logits = tf.matmul(queries, candidates, transpose_b=True)
                logits -= tf.math.log(probability)[None, :]
                loss = tf.reduce_mean(
                    tf.reduce_logsumexp(logits, axis=1) - tf.linalg.diag_part(logits)
                )
            gradients = tape.gradient(loss, tables + dense)
            for table, accumulator, gradient in zip(
                tables, table_accumulators, gradients[:2], strict=True
            ):
                sparse_adagrad(table, accumulator, gradient)
            for variable, accumulator, gradient in zip(
                dense, dense_accumulators, gradients[2:], strict=True
            ):
                accumulator.assign_add(gradient * gradient)
                variable.assign_sub(
                    REALISTIC_LEARNING_RATE * gradient / tf.sqrt(accumulator + ADAGRAD_EPSILON)
                )

    rng = np.random.default_rng(1)

    def one_epoch() -> None:
        epoch(tf.constant(rng.permutation(steps * REALISTIC_BATCH)))
        tables[1][:1].numpy()  # the last step is done

    return _figures(one_epoch, steps, repeats)


def torch_realistic_floor(steps: int, repeats: int) -> dict[str, Any]:
    """The realistic step by hand in torch: an eager loop, `torch.optim.Adagrad`.

    `nn.Embedding(sparse=True)` tables (sparse gradients: Adagrad coalesces the
    duplicate ids and updates those rows and their state only), `nn.Linear`
    layers, the columns as tensors and `torch.randperm` per epoch.
    """
    import torch

    data = realistic_data(steps)
    users, items, probability = (
        torch.from_numpy(data[key])
        for key in ("query", "candidate", "candidate_sampling_probability")
    )
    users, items = users.long(), items.long()
    initial = _realistic_initial_values()
    tables = [
        torch.nn.Embedding.from_pretrained(torch.from_numpy(t), freeze=False, sparse=True)
        for t in initial["tables"]
    ]
    towers = []
    for start in (0, 4):
        kernel_1, bias_1, kernel_2, bias_2 = initial["dense"][start : start + 4]
        layers = [
            torch.nn.Linear(REALISTIC_DIM, REALISTIC_HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(REALISTIC_HIDDEN, REALISTIC_DIM),
        ]
        with torch.no_grad():
            for layer, kernel, bias in (
                (layers[0], kernel_1, bias_1),
                (layers[2], kernel_2, bias_2),
            ):
                layer.weight.copy_(torch.from_numpy(kernel.T))  # torch's weight is [out, in]
                layer.bias.copy_(torch.from_numpy(bias))
        towers.append(torch.nn.Sequential(*layers))
    parameters = [t.weight for t in tables] + [p for tower in towers for p in tower.parameters()]
    optimizer = torch.optim.Adagrad(
        parameters,
        lr=REALISTIC_LEARNING_RATE,
        initial_accumulator_value=ADAGRAD_INITIAL,
        eps=ADAGRAD_EPSILON,
    )
    log_q = torch.log(probability)
    positives = torch.arange(REALISTIC_BATCH)  # row i's positive is column i

    def epoch() -> None:
        order = torch.randperm(steps * REALISTIC_BATCH)
        for start in range(0, steps * REALISTIC_BATCH, REALISTIC_BATCH):
            rows = order[start : start + REALISTIC_BATCH]
            optimizer.zero_grad(set_to_none=True)
            queries = towers[0](tables[0](users[rows]))
            candidates = towers[1](tables[1](items[rows]))
            logits = queries @ candidates.T - log_q[rows][None, :]
            torch.nn.functional.cross_entropy(logits, positives).backward()
            optimizer.step()

    result = _figures(epoch, steps, repeats)
    result["threads"] = torch.get_num_threads()
    return result


REALISTIC_FLOORS = {
    "jax": jax_realistic_floor,
    "tensorflow": tensorflow_realistic_floor,
    "torch": torch_realistic_floor,
}


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
    parser.add_argument(
        "--config",
        choices=("tutorial", "realistic"),
        default="tutorial",
        help="the keras-rs tutorial comparison, or the realistic configuration (issue 37)",
    )
    parser.add_argument(
        "--steps", type=int, default=REALISTIC_STEPS, help="realistic: batches per epoch"
    )
    parser.add_argument(
        "--repeats", type=int, default=REALISTIC_REPEATS, help="realistic: timed epochs"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="warm", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _common.report(_worker(args))
        return
    if args.config == "realistic":
        _realistic_table(args)
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


def _realistic_table(args: argparse.Namespace) -> None:
    """The realistic configuration per backend: fit and floor, each in its own process."""
    print(
        f"realistic configuration (issue 37): batch {REALISTIC_BATCH:,}, SparseEmbedding "
        f"tables of {REALISTIC_ITEMS:,} items and {REALISTIC_USERS:,} users, dim "
        f"{REALISTIC_DIM}, towers table -> Dense({REALISTIC_HIDDEN}, relu) -> "
        f"Dense({REALISTIC_DIM}), in-batch softmax with logQ, Adagrad; warm ms/step, best "
        f"of {args.repeats} epochs of {args.steps} steps after a first epoch"
    )
    print(
        "| backend | fit ms/step | floor ms/step | fit / floor | fit first epoch "
        "| floor first epoch | fit peak RSS | floor peak RSS | torch threads |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for backend in args.backends.split(","):
        fit = _run_worker(backend, "realistic-fit", args)
        floor = _run_worker(backend, "realistic-floor", args)
        print(
            f"| {backend} | {fit['ms_per_step']:.1f} | {floor['ms_per_step']:.1f} "
            f"| {fit['ms_per_step'] / floor['ms_per_step']:.2f}x "
            f"| {fit['first_epoch_s']:.1f} s | {floor['first_epoch_s']:.1f} s "
            f"| {fit['peak_rss_mib']:,.0f} MiB | {floor['peak_rss_mib']:,.0f} MiB "
            f"| {floor.get('threads', '-')} |",
            flush=True,
        )
        print(
            f"  ({backend}, each timed epoch, ms/step (CPU ms/step): fit {_listed(fit)}; "
            f"floor {_listed(floor)})",
            flush=True,
        )


def _listed(figures: dict[str, Any]) -> str:
    """Each timed epoch: wall-clock ms/step (CPU ms/step of the process)."""
    return ", ".join(f"{wall:.1f} ({cpu:.0f})" for wall, cpu in figures["epochs"])


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    _common.use_backend(args.worker)
    import keras

    keras.utils.set_random_seed(42)
    if args.mode == "realistic-fit":
        return library_realistic(args.steps, args.repeats)
    if args.mode == "realistic-floor":
        return REALISTIC_FLOORS[args.worker](args.steps, args.repeats)
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
    arguments += ["--steps", str(args.steps), "--repeats", str(args.repeats)]
    if args.data_dir:
        arguments += ["--data-dir", args.data_dir]
    return _common.worker_result(__file__, arguments, f"{backend} ({mode})")


if __name__ == "__main__":
    main()
