"""A Keras callback that ranks validation next items after each epoch and keeps the best."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from two_tower import _arguments
from two_tower.evaluation.next_item import evaluate_next_item


class RetrievalValidation(keras.callbacks.Callback):
    """Validates next-item retrieval after each epoch; restores the best epoch's weights.

    After every `frequency` epochs it embeds the validation queries and the
    catalogue with the model being trained, ranks each query's target
    (`evaluate_next_item`: over the catalogue less `exclude`, and, with
    `negatives`, against those), and adds the results to the epoch's logs as
    `val_full_hr@10`, `val_full_ndcg@10`, ... and `val_sampled_...`, so they
    show in the progress bar and in `fit`'s `History`. It keeps the weights of
    the epoch with the best `monitor` value and puts them back when training
    ends, and with `patience` it stops training after that many validations
    without improvement. Keras' `EarlyStopping` cannot do this alone: the
    metrics are not computed by `evaluate`.

    Args:
        queries: the query tower's inputs for the validation queries, e.g.
            `{"history": validation.histories(log, width)}`.
        targets: `[queries]` item index of each query's next item.
        catalogue: the candidate tower's inputs for every catalogue row (row i
            embeds item i); defaults to `np.arange(model.catalogue_size)`.
        exclude: `[queries, width]` items left out of the full ranking (the
            queries' input items), -1 as padding; None leaves nothing out.
        negatives: `[queries, num]` sampled items for the sampled protocol
            (`sample_negatives`); None skips it.
        ks: cut-offs.
        monitor: the result to maximise, e.g. `"full_ndcg@10"` or
            `"sampled_hr@10"`.
        restore_best_weights: put the best epoch's weights back at the end.
        patience: stop after this many validations without improvement; None
            never stops.
        frequency: validate every this many epochs (and always after the
            last one, when `fit` says how many there are).
        batch_size: queries embedded and scored at once.
        verbose: 1 prints a line when the best weights are restored.

    Attributes:
        best: the best `monitor` value so far; `best_epoch` its epoch (0-based).
        history: `{epoch: results}` of every validation.

    Raises:
        ValueError: bad arguments; a `monitor` that the results do not hold
            (at the first validation).

    Examples:
        >>> import numpy as np
        >>> model = two_tower.TwoTowerRetrieval(
        ...     two_tower.SequenceTower(max_length=3, dropout=0.0),
        ...     two_tower.IdEmbeddingTower(6, embedding_dim=4),
        ...     loss="full_softmax", catalogue_size=6)
        >>> model.compile(optimizer="adam")
        >>> x = {"query": {"sequence": np.array([[1, 2, 3]]), "segment": np.array([[1, 1, 1]])},
        ...      "candidate": np.array([[2, 3, 4]])}
        >>> validation = two_tower.evaluation.RetrievalValidation(
        ...     {"history": np.array([[3, 2, 1]])}, np.array([4]), ks=(5,),
        ...     monitor="full_hr@5", verbose=0)
        >>> history = model.fit(x, epochs=2, verbose=0, callbacks=[validation])
        >>> sorted(history.history)
        ['loss', 'val_full_hr@5', 'val_full_mrr@5', 'val_full_ndcg@5']
    """

    def __init__(
        self,
        queries: Any,
        targets: Any,
        *,
        catalogue: Any = None,
        exclude: Any = None,
        negatives: Any = None,
        ks: Sequence[int] = (10,),
        monitor: str = "full_ndcg@10",
        restore_best_weights: bool = True,
        patience: int | None = None,
        frequency: int = 1,
        batch_size: int = 1024,
        verbose: int = 1,
    ) -> None:
        super().__init__()
        owner = "RetrievalValidation"
        self.queries = queries
        self.targets = np.asarray(targets)
        self.catalogue = catalogue
        self.exclude = exclude
        self.negatives = negatives
        self.ks = tuple(ks)
        if not isinstance(monitor, str) or not monitor.startswith(("full_", "sampled_")):
            raise ValueError(
                f"{owner}: `monitor` must name a result, 'full_...' or 'sampled_...' (e.g. "
                f"'full_ndcg@10'). Received: monitor={monitor!r}"
            )
        if monitor.startswith("sampled_") and negatives is None:
            raise ValueError(
                f"{owner}: monitor={monitor!r} needs `negatives` (the sampled protocol)."
            )
        self.monitor = monitor
        self.restore_best_weights = _arguments.boolean(
            "restore_best_weights", restore_best_weights, owner=owner
        )
        self.patience = (
            None if patience is None else _arguments.integer("patience", patience, owner=owner)
        )
        self.frequency = _arguments.integer("frequency", frequency, owner=owner)
        self.batch_size = _arguments.integer("batch_size", batch_size, owner=owner)
        self.verbose = verbose
        self.best = -np.inf
        self.best_epoch: int | None = None
        self.history: dict[int, dict[str, float]] = {}
        self._best_weights: list[np.ndarray] | None = None
        self._waited = 0

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self.best, self.best_epoch, self._best_weights, self._waited = -np.inf, None, None, 0
        if self.catalogue is None and getattr(self.model, "catalogue_size", None) is None:
            raise ValueError(
                "RetrievalValidation needs `catalogue` (the candidate tower's inputs for every "
                "item) when the model has no `catalogue_size` (e.g. loss='softmax'): pass "
                "catalogue=np.arange(num_items)."
            )

    def evaluate(self) -> dict[str, float]:
        """The model's results now: `{"full_hr@10": ..., "sampled_hr@10": ..., ...}`."""
        model = self.model
        queries = np.asarray(
            model.predict(self.queries, batch_size=self.batch_size, verbose=0), "float32"
        )
        catalogue = self.catalogue
        if catalogue is None:
            size = getattr(model, "catalogue_size", None)
            if size is None:
                raise ValueError(
                    "RetrievalValidation needs `catalogue` (the candidate tower's inputs for "
                    "every item) when the model has no `catalogue_size`."
                )
            catalogue = np.arange(size, dtype="int32")
        blocks = []
        rows = len(keras.tree.flatten(catalogue)[0])
        for start in range(0, rows, 65536):
            part = keras.tree.map_structure(
                lambda a, block=slice(start, start + 65536): a[block], catalogue
            )
            blocks.append(np.asarray(ops.convert_to_numpy(model.embed_candidates(part))))
        items = np.concatenate(blocks).astype("float32")
        similarity = getattr(model, "compute_similarities", None)
        protocols = {"full": {"exclude": self.exclude}}
        if self.negatives is not None:
            protocols["sampled"] = {"negatives": self.negatives}
        results = {}
        for protocol, arguments in protocols.items():
            found = evaluate_next_item(
                queries,
                items,
                self.targets,
                ks=self.ks,
                batch_size=self.batch_size,
                similarity_fn=similarity,
                **arguments,
            )
            results.update({f"{protocol}_{k}": v for k, v in found.items()})
        return results

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        last = self.params.get("epochs") if self.params else None
        if (epoch + 1) % self.frequency and (last is None or epoch + 1 != last):
            return
        results = self.evaluate()
        if self.monitor not in results:
            raise ValueError(
                f"RetrievalValidation: monitor={self.monitor!r} is not among the results "
                f"{sorted(results)}."
            )
        self.history[epoch] = results
        if logs is not None:
            logs.update({f"val_{key}": value for key, value in results.items()})
        if results[self.monitor] > self.best:
            self.best, self.best_epoch, self._waited = results[self.monitor], epoch, 0
            if self.restore_best_weights:
                self._best_weights = [np.array(w) for w in self.model.get_weights()]
            return
        self._waited += 1
        if self.patience is not None and self._waited >= self.patience:
            self.model.stop_training = True

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        if not self.restore_best_weights or self._best_weights is None:
            return
        self.model.set_weights(self._best_weights)
        if self.verbose and self.best_epoch is not None:
            print(
                f"RetrievalValidation: restored the weights of epoch {self.best_epoch + 1} "
                f"({self.monitor} {self.best:.4f})."
            )
