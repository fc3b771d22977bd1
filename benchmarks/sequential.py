"""Next-item retrieval on SASRec's data: `SequenceTower` against popularity and `HistoryTower`.

The leave-one-out protocol of SASRec's paper (Kang & McAuley, ICDM 2018): each
user's last item is the test target and the one before it the validation
target; users with fewer than 3 interactions only train. A query's input is its
user's last `max_length` items before the target. Two rankings of the target:

- sampled: against 100 items the user never interacted with, drawn uniformly
  (seeded), as the paper reports;
- full: against every item, the query's input items left out.

The model trains per position on packed sequences (`SequenceDataset`), validates
after each epoch on the validation targets (`RetrievalValidation`, full NDCG@10),
keeps the best epoch's weights and is then tested once. Tuning reads the
validation figures only.

    python benchmarks/sequential.py --data ../shared/datasets/sasrec-video/Video.txt \\
        --backend jax --json /tmp/sequential-jax.json

Prints both metric sets for the model, popularity and (unless `--no-history`)
`HistoryTower(pooling="recency")` trained on every prefix, the training time and
seconds per epoch, and the peak memory of the process; writes
`{"sampled": {"hr@10", "ndcg@10"}, "full": {"hr@10", "ndcg@10"}, "train_s", ...}`
to `--json`.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

import _common

KS = (10,)


def _parser() -> Any:
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--data", required=True, help="a 'user item [time]' file")
    parser.add_argument("--backend", default="jax")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="at most this many")
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="packed rows per batch")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--blocks", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--dropout", type=float, default=None)
    parser.add_argument("--positions", default=None)
    parser.add_argument("--loss", default=None)
    parser.add_argument("--negatives", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--validate-every", type=int, default=1, help="epochs per validation")
    parser.add_argument("--item-bias", type=int, default=None, help="1: a learned item bias")
    parser.add_argument("--logq", type=int, default=None, help="1: in-batch logQ correction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-history", action="store_true", help="skip the HistoryTower row")
    parser.add_argument("--no-test", action="store_true", help="validation only (tuning)")
    return parser


def _row(name: str, results: dict[str, dict[str, float]], extra: str = "") -> str:
    full, sampled = results["full"], results["sampled"]
    return (
        f"| {name} | {sampled['hr@10']:.4f} | {sampled['ndcg@10']:.4f} | "
        f"{full['hr@10']:.4f} | {full['ndcg@10']:.4f} | {extra} |"
    )


def main() -> None:
    args = _parser().parse_args()
    _common.use_backend(args.backend)
    import keras
    import numpy as np

    import two_tower
    from two_tower.evaluation import evaluate_next_item, sample_negatives

    config = dict(two_tower.defaults.SEQUENCE)
    for key, value in {
        "max_length": args.max_length,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "embedding_dim": args.dim,
        "num_blocks": args.blocks,
        "num_heads": args.heads,
        "dropout": args.dropout,
        "positions": args.positions,
        "loss": args.loss,
        "num_sampled_negatives": args.negatives,
        "learning_rate": args.learning_rate,
        "temperature": args.temperature,
        "item_bias": None if args.item_bias is None else bool(args.item_bias),
        "sampling_probability": None if args.logq is None else bool(args.logq),
    }.items():
        if value is not None:
            config[key] = value
    if config["loss"] != "sampled_softmax":
        config.pop("num_sampled_negatives", None)
    print(f"backend {keras.backend.backend()}, configuration {config}", flush=True)
    keras.utils.set_random_seed(args.seed)

    data = two_tower.datasets.read_interactions(args.data)
    raw_items, items = np.unique(data["items"], return_inverse=True)
    num_items = len(raw_items)
    log = two_tower.InteractionLog(data["users"], items, data["times"])
    train, validation, test = log.leave_one_out()
    width = config["max_length"]
    print(
        f"{len(log):,} interactions, {log.num_users:,} users, {num_items:,} items; "
        f"{len(train):,} training interactions, {len(test):,} test users",
        flush=True,
    )

    def protocol(queries: Any, seed: int) -> dict[str, Any]:
        histories = queries.histories(log, width)
        everything = log.history(queries.users, np.full(len(queries), np.inf), None)
        return {
            "histories": histories,
            "targets": queries.items,
            "negatives": sample_negatives(everything, num_items, 100, seed=seed),
        }

    valid_set, test_set = protocol(validation, 1), protocol(test, 2)

    def evaluate(embed: Any, catalogue: Any, split: dict[str, Any], similarity: Any = None) -> Any:
        options = {"ks": KS, "similarity_fn": similarity}
        queries = embed(split["histories"])
        return {
            "full": evaluate_next_item(
                queries, catalogue, split["targets"], exclude=split["histories"], **options
            ),
            "sampled": evaluate_next_item(
                queries, catalogue, split["targets"], negatives=split["negatives"], **options
            ),
        }

    # ---------------------------------------------------------------- the model
    model = two_tower.TwoTowerRetrieval.for_sequences(num_items, **config)
    model.compile(optimizer=two_tower.defaults.sequence_optimizer(config["learning_rate"]))
    batches = two_tower.datasets.SequenceDataset(
        train,
        max_length=width,
        batch_size=config["batch_size"],
        seed=args.seed,
        sampling_probability=config["sampling_probability"],
    )
    validate = two_tower.evaluation.RetrievalValidation(
        {"history": valid_set["histories"]},
        valid_set["targets"],
        exclude=valid_set["histories"],
        negatives=valid_set["negatives"],
        monitor="full_ndcg@10",
        patience=args.patience,
        frequency=args.validate_every,
    )

    class EpochTimes(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            # Runs before RetrievalValidation (listed first): training time only.
            seconds.append(time.perf_counter() - self.start)

    class Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            results = validate.history.get(epoch)
            if results is not None:
                print(
                    f"epoch {epoch + 1}: {seconds[epoch]:.1f} s, validation full NDCG@10 "
                    f"{results['full_ndcg@10']:.4f} HR@10 {results['full_hr@10']:.4f}, sampled "
                    f"NDCG@10 {results['sampled_ndcg@10']:.4f} "
                    f"HR@10 {results['sampled_hr@10']:.4f}",
                    flush=True,
                )

    seconds: list[float] = []
    start = time.perf_counter()
    model.fit(
        batches,
        epochs=config["epochs"],
        verbose=0,
        callbacks=[EpochTimes(), validate, Progress()],
    )
    train_s = time.perf_counter() - start
    best = validate.best_epoch
    print(
        f"best epoch {best + 1}; training {train_s:.0f} s, {np.median(seconds):.1f} s/epoch "
        f"(median, {batches.num_targets:,} targets in {len(batches)} batches)",
        flush=True,
    )
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result: dict[str, Any] = {
        "backend": keras.backend.backend(),
        "config": config,
        "validation": validate.history[best],
        "best_epoch": best + 1,
        "train_s": train_s,
        "s_per_epoch": float(np.median(seconds)),
        "epochs_run": len(seconds),
        "peak_rss_gib": peak_gib,
    }
    if args.no_test:
        print(json.dumps(result["validation"]))
        _write(args.json, result)
        return

    catalogue = keras.ops.convert_to_numpy(
        model.embed_candidates(np.arange(num_items, dtype="int32"))
    )

    def embed_model(histories: Any) -> Any:
        return model.predict({"history": histories}, batch_size=1024, verbose=0)

    rows = {"SequenceTower": evaluate(embed_model, catalogue, test_set, model.compute_similarities)}
    result.update(rows["SequenceTower"])

    popularity = two_tower.baselines.Popularity(num_items).fit(
        train.sequences()[2]  # every training interaction's item
    )
    rows["popularity"] = evaluate(
        popularity.embed_histories, popularity.catalogue_embeddings(), test_set
    )
    if not args.no_history:
        rows["HistoryTower"], history_s = _history_tower(
            two_tower, keras, np, train, num_items, width, test_set, evaluate
        )
        result["history_tower"] = rows["HistoryTower"]
    print("\n| system | sampled HR@10 | sampled NDCG@10 | full HR@10 | full NDCG@10 | training |")
    print("|---|---|---|---|---|---|")
    print(
        _row(
            "SequenceTower",
            rows["SequenceTower"],
            f"{train_s:.0f} s ({result['s_per_epoch']:.1f} s/epoch, best of {len(seconds)} epochs)",
        )
    )
    if "HistoryTower" in rows:
        print(_row('HistoryTower(pooling="recency")', rows["HistoryTower"], f"{history_s:.0f} s"))
    print(_row("popularity", rows["popularity"], "–"))
    print(f"\npeak resident memory {peak_gib:.2f} GiB")
    _write(args.json, result)


def _history_tower(two_tower, keras, np, train, num_items, width, test_set, evaluate):  # type: ignore[no-untyped-def]
    """The previous best: `HistoryTower(pooling="recency")`, full softmax, a row per prefix."""
    users, offsets, items = train.sequences()
    counts = np.diff(offsets)
    has_prefix = np.arange(len(items)) > np.repeat(offsets[:-1], counts)  # not a first item
    # Each training interaction (not a user's first) is a request at its own time.
    ordinal = np.arange(len(items), dtype=np.float64)
    request_users = np.repeat(users, counts)[has_prefix]
    positional = two_tower.InteractionLog(np.repeat(users, counts), items, ordinal)
    histories = positional.history(request_users, ordinal[has_prefix], width)
    model = two_tower.TwoTowerRetrieval(
        two_tower.HistoryTower(max_length=width, pooling="recency"),
        two_tower.IdEmbeddingTower(num_items, embedding_dim=64),
        loss="full_softmax",
        catalogue_size=num_items,
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    start = time.perf_counter()
    model.fit(
        {"query": {"history": histories}, "candidate": items[has_prefix]},
        batch_size=256,
        epochs=6,
        verbose=0,
    )
    seconds = time.perf_counter() - start
    catalogue = keras.ops.convert_to_numpy(
        model.embed_candidates(np.arange(num_items, dtype="int32"))
    )

    def embed(h):  # type: ignore[no-untyped-def]
        return model.predict({"history": h}, batch_size=1024, verbose=0)

    return evaluate(embed, catalogue, test_set), seconds


def _write(path: str | None, result: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as file:
            json.dump(result, file, indent=1)


if __name__ == "__main__":
    sys.exit(main())
