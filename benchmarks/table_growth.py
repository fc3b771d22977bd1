"""Training cost against table size: dense Keras updates against row-sparse ones.

One configuration, only the candidate table's row count changing: in-batch
softmax, batch 1024, dim 64, Adam(1e-3), a 100,000-row query table, uniform
random ids, `two_tower.defaults.steps_per_execution()`. Per backend and size:
- dense: `keras.layers.Embedding` towers; Keras' optimizer updates every row of
  both tables at every step;
- sparse: `two_tower.SparseEmbedding` towers; only the looked-up rows (and their
  lazy-Adam moments) are updated;
- floor (JAX only): the same sparse step (sorted segment sums, lazy Adam)
  written by hand in JAX: one jitted step with its state donated, the batches
  already on the device. No Keras `fit` loop does less work per step.
Each measurement runs in a fresh process: a warm-up `fit` (compilation), then a
timed `fit` over `--steps` batches. The machine is shared, so compare within a
row (dense, sparse and floor run back to back), not across rows.

    python benchmarks/table_growth.py --backends jax,tensorflow,torch \\
        --rows 10000,100000,1000000,10000000 --json table_growth.json --plot docs/table_growth.png
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import _common

BATCH = 1024
DIM = 64
QUERY_ROWS = 100_000
LEARNING_RATE = 1e-3


def _data(rows: int, steps: int, seed: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    count = BATCH * steps
    return {
        "query": rng.integers(0, QUERY_ROWS, count).astype("int32"),
        "candidate": rng.integers(0, rows, count).astype("int32"),
    }


def fit_ms_per_step(variant: str, rows: int, steps: int, warmup_steps: int) -> float:
    """Warm `fit` time per step of the dense or the sparse model."""
    import keras

    import two_tower

    table = two_tower.SparseEmbedding if variant == "sparse" else keras.layers.Embedding
    model = two_tower.TwoTowerRetrieval(
        table(QUERY_ROWS, DIM), table(rows, DIM), loss="softmax", name=variant
    )
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        steps_per_execution=two_tower.defaults.steps_per_execution(),
    )
    model.fit(_data(rows, warmup_steps, 0), batch_size=BATCH, epochs=1, verbose=0)
    timed = _data(rows, steps, 1)
    started = time.perf_counter()
    model.fit(timed, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    return 1000 * (time.perf_counter() - started) / steps


def jax_floor_ms_per_step(rows: int, steps: int) -> float:
    """The sparse lazy-Adam step by hand in JAX: one jitted step, data on the device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    beta_1, beta_2, epsilon = 0.9, 0.999, 1e-7

    def loss_of_rows(query_rows: Any, candidate_rows: Any) -> Any:
        logits = query_rows @ candidate_rows.T
        return -jnp.mean(jnp.diag(jax.nn.log_softmax(logits, axis=1)))

    def lazy_adam(state: Any, ids: Any, gradients: Any, step: Any) -> Any:
        table, momentum, velocity = state
        order = jnp.argsort(ids)
        ids = ids[order]
        starts = jnp.concatenate([jnp.ones(1, "int32"), (ids[1:] != ids[:-1]).astype("int32")])
        segments = jnp.cumsum(starts) - 1
        sums = jax.ops.segment_sum(gradients[order], segments, num_segments=ids.shape[0])
        gradients = sums[segments]
        m = momentum[ids] + (gradients - momentum[ids]) * (1 - beta_1)
        v = velocity[ids] + (gradients**2 - velocity[ids]) * (1 - beta_2)
        alpha = LEARNING_RATE * jnp.sqrt(1 - beta_2**step) / (1 - beta_1**step)
        rows = table[ids] - m * alpha / (jnp.sqrt(v) + epsilon)
        return (table.at[ids].set(rows), momentum.at[ids].set(m), velocity.at[ids].set(v))

    def train_step(carry: Any, batch: Any) -> Any:
        query_state, candidate_state, step = carry
        query_ids, candidate_ids = batch
        query_rows = query_state[0][query_ids]
        candidate_rows = candidate_state[0][candidate_ids]
        query_grads, candidate_grads = jax.grad(loss_of_rows, argnums=(0, 1))(
            query_rows, candidate_rows
        )
        step = step + 1
        query_state = lazy_adam(query_state, query_ids, query_grads, step)
        candidate_state = lazy_adam(candidate_state, candidate_ids, candidate_grads, step)
        return (query_state, candidate_state, step), None

    # The state is donated, so XLA scatters the rows into it in place (without
    # donation every call would copy the tables: O(rows)).
    step_function = jax.jit(lambda carry, batch: train_step(carry, batch)[0], donate_argnums=0)

    def run(carry: Any, batches: Any) -> Any:
        for batch in zip(*batches, strict=True):
            carry = step_function(carry, batch)
        return carry

    def state(count: int) -> Any:
        rng = np.random.default_rng(count)
        table = jnp.asarray(rng.uniform(-0.05, 0.05, (count, DIM)).astype("float32"))
        return (table, jnp.zeros((count, DIM)), jnp.zeros((count, DIM)))

    def batches(seed: int) -> Any:
        data = _data(rows, steps, seed)
        return tuple(
            list(jnp.asarray(data[key].reshape(steps, BATCH))) for key in ("query", "candidate")
        )

    carry = (state(QUERY_ROWS), state(rows), jnp.zeros((), "float32"))
    carry = jax.block_until_ready(run(carry, batches(0)))  # compile
    timed = jax.block_until_ready(batches(1))
    started = time.perf_counter()
    jax.block_until_ready(run(carry, timed))
    return 1000 * (time.perf_counter() - started) / steps


def _worker(backend: str, rows: int, args: argparse.Namespace) -> dict[str, float]:
    _common.use_backend(backend)
    import keras

    keras.utils.set_random_seed(0)
    result = {}
    for variant in ("dense", "sparse"):
        if variant == "dense" and rows > args.dense_max_rows:
            continue
        result[f"{variant}_ms_per_step"] = fit_ms_per_step(
            variant, rows, args.steps, args.warmup_steps
        )
    if backend == "jax" and args.floor:
        result["floor_ms_per_step"] = jax_floor_ms_per_step(rows, args.steps)
    return result


def _run_worker(backend: str, rows: int, args: argparse.Namespace) -> dict[str, float]:
    arguments = ["--worker", backend, "--rows", str(rows)]
    arguments += ["--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps)]
    arguments += ["--dense-max-rows", str(args.dense_max_rows)]
    arguments += [] if args.floor else ["--no-floor"]
    result: dict[str, float] = _common.worker_result(
        __file__, arguments, f"{backend} at {rows} rows"
    )
    return result


def _plot(results: dict[str, dict[str, dict[str, float]]], path: str) -> None:
    plt = _common.pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    colours = {"jax": "tab:blue", "tensorflow": "tab:orange", "torch": "tab:red"}
    styles = {"dense": "--", "sparse": "-", "floor": ":"}
    for backend, sizes in results.items():
        for variant, style in styles.items():
            points = [
                (int(rows), figures[f"{variant}_ms_per_step"])
                for rows, figures in sizes.items()
                if f"{variant}_ms_per_step" in figures
            ]
            if points:
                axes.plot(
                    *zip(*points, strict=True),
                    style,
                    marker="o",
                    color=colours.get(backend, "black"),
                    label=f"{backend} {variant}",
                )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("candidate table rows")
    axes.set_ylabel("ms per training step (batch 1024)")
    axes.set_title("Training step time as the table grows (Adam, dim 64)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = _common.argument_parser(__doc__)
    _common.add_backends_argument(parser)
    parser.add_argument("--rows", default="10000,100000,1000000,10000000")
    parser.add_argument("--steps", type=int, default=64, help="timed steps per fit")
    parser.add_argument("--warmup-steps", type=int, default=32)
    parser.add_argument(
        "--dense-max-rows",
        type=int,
        default=10_000_000,
        help="skip the dense model above this many rows (it is O(rows) per step)",
    )
    parser.add_argument("--no-floor", dest="floor", action="store_false")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--plot", default=None, help="save a PNG of time against rows")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = sorted(int(rows) for rows in args.rows.split(","))
    if args.worker:
        _common.report(_worker(args.worker, sizes[0], args))
        return

    results: dict[str, dict[str, dict[str, float]]] = {}
    print(f"ms per step, batch {BATCH}, dim {DIM}, in-batch softmax, Adam; {args.steps} steps")
    print(
        "| backend | rows | dense ms/step | sparse ms/step | dense/sparse "
        f"| sparse vs {min(sizes):,} rows | sparse ex/s | floor ms/step | sparse/floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for backend in args.backends.split(","):
        results[backend] = {}
        for rows in sizes:
            figures = _run_worker(backend, rows, args)
            results[backend][str(rows)] = figures
            dense = figures.get("dense_ms_per_step")
            sparse = figures["sparse_ms_per_step"]
            floor = figures.get("floor_ms_per_step")
            growth = sparse / results[backend][str(sizes[0])]["sparse_ms_per_step"]
            print(
                f"| {backend} | {rows:,} | {'-' if dense is None else f'{dense:.1f}'} | "
                f"{sparse:.1f} | {'-' if dense is None else f'{dense / sparse:.1f}x'} | "
                f"{growth:.2f}x | {1000 * BATCH / sparse:,.0f} | "
                f"{'-' if floor is None else f'{floor:.1f}'} | "
                f"{'-' if floor is None else f'{sparse / floor:.2f}x'} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    if args.plot:
        _plot(results, args.plot)


if __name__ == "__main__":
    main()
