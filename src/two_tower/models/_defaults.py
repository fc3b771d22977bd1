"""The arguments of `TwoTowerRetrieval.from_ids`: the tuned id-tower configuration."""

from __future__ import annotations

from typing import Any

from two_tower import defaults
from two_tower.models.retrieval_task import CATALOGUE_LOSSES
from two_tower.preprocessing.vocabulary import Vocabulary
from two_tower.towers.id_embedding_tower import IdEmbeddingTower
from two_tower.towers.sequence_tower import SequenceTower

_SEQUENCE_TOWER = ("max_length", "num_blocks", "num_heads", "dropout", "positions")


def sequence_model_arguments(num_items: int, **options: Any) -> dict[str, Any]:
    """`TwoTowerRetrieval` arguments of `for_sequences`: `defaults.SEQUENCE` and `options`."""
    known = set(defaults.SEQUENCE) - set(defaults.SEQUENCE_TRAINING)
    model_options = {key: value for key, value in options.items() if key not in known}
    clash = sorted(set(model_options) & {"query_tower", "candidate_tower", "catalogue_size"})
    if clash:
        raise TypeError(f"for_sequences builds {clash} itself; received them as arguments.")
    config = {key: options.get(key, defaults.SEQUENCE[key]) for key in known}
    if config["loss"] != "sampled_softmax":
        config["num_sampled_negatives"] = None
    bias = bool(config["item_bias"])
    return {
        "query_tower": SequenceTower(
            **{key: config[key] for key in _SEQUENCE_TOWER},
            bias="constant" if bias else None,
            name="query_tower",
        ),
        "candidate_tower": IdEmbeddingTower(
            num_items,
            config["embedding_dim"],
            bias="learned" if bias else None,
            name="candidate_tower",
        ),
        "loss": config["loss"],
        "temperature": config["temperature"],
        "catalogue_size": num_items if config["loss"] in CATALOGUE_LOSSES else None,
        "num_sampled_negatives": config["num_sampled_negatives"],
        **model_options,
    }


def id_model_arguments(
    num_queries: int | None,
    num_candidates: int | None,
    *,
    embedding_dim: int | None,
    l2: float | None,
    temperature: float | None,
    sparse: bool | None,
    query_vocabulary: Vocabulary | None,
    candidate_vocabulary: Vocabulary | None,
    **kwargs: Any,
) -> dict[str, Any]:
    """`TwoTowerRetrieval` arguments: `IdEmbeddingTower`s and `two_tower.defaults`."""
    sizes = {}
    for name, size, vocabulary in (
        ("num_queries", num_queries, query_vocabulary),
        ("num_candidates", num_candidates, candidate_vocabulary),
    ):
        side = "query" if name == "num_queries" else "candidate"
        if vocabulary is not None and not isinstance(vocabulary, Vocabulary):
            raise ValueError(
                f"from_ids: `{side}_vocabulary` must be a two_tower.Vocabulary (adapted "
                f"to the raw ids) or None. Received {type(vocabulary).__name__}: "
                f"{vocabulary!r:.80}. Build one with `Vocabulary()` and `adapt(ids)`."
            )
        if size is None and isinstance(vocabulary, Vocabulary):
            size = vocabulary.size
        if size is None:
            raise ValueError(
                f"from_ids needs `{name}`, or a vocabulary whose size gives it. Received "
                f"{name}=None and no vocabulary."
            )
        sizes[name] = size
    dim = defaults.EMBEDDING_DIM if embedding_dim is None else embedding_dim
    penalty = defaults.L2 if l2 is None else l2
    sparse = defaults.SPARSE if sparse is None else sparse
    kwargs.setdefault("loss", defaults.LOSS)
    if kwargs["loss"] in CATALOGUE_LOSSES:
        kwargs.setdefault("catalogue_size", sizes["num_candidates"])
    clash = sorted(set(kwargs) & {"query_tower", "candidate_tower", "temperature"})
    if clash:
        raise TypeError(f"from_ids builds {clash} itself; received them in **kwargs.")
    return {
        "query_tower": IdEmbeddingTower(
            sizes["num_queries"],
            dim,
            l2=penalty,
            bias="constant",
            sparse=sparse,
            name="query_tower",
        ),
        "candidate_tower": IdEmbeddingTower(
            sizes["num_candidates"],
            dim,
            l2=penalty,
            bias="learned",
            sparse=sparse,
            name="candidate_tower",
        ),
        "temperature": defaults.TEMPERATURE if temperature is None else temperature,
        "query_vocabulary": query_vocabulary,
        "candidate_vocabulary": candidate_vocabulary,
        **kwargs,
    }
