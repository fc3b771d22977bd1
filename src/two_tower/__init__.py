"""two_tower: two-tower retrieval recommenders on Keras 3 (JAX, TensorFlow, PyTorch)."""

from two_tower._version import __version__
from two_tower.backends._installed import check_backend_installed

check_backend_installed()

from two_tower import (  # noqa: E402
    baselines,
    datasets,
    defaults,
    distribution,
    evaluation,
    losses,
    negatives,
    saving,
)
from two_tower.embeddings.hashed_embedding import HashedEmbedding  # noqa: E402
from two_tower.embeddings.quotient_remainder_embedding import QuotientRemainderEmbedding  # noqa: E402
from two_tower.metrics.factorized_top_k import FactorizedTopK  # noqa: E402
from two_tower.models.two_tower_retrieval import TwoTowerRetrieval  # noqa: E402
from two_tower.preprocessing.interaction_log import InteractionLog  # noqa: E402
from two_tower.preprocessing.vocabulary import Vocabulary  # noqa: E402
from two_tower.retrieval.brute_force_index import BruteForceIndex  # noqa: E402
from two_tower.retrieval.faiss_index import FaissIndex  # noqa: E402
from two_tower.sparse.row_wise_adagrad import RowWiseAdagrad  # noqa: E402
from two_tower.sparse.sparse_embedding import SparseEmbedding  # noqa: E402
from two_tower.towers.feature_tower import FeatureTower  # noqa: E402
from two_tower.towers.history_tower import HistoryTower  # noqa: E402
from two_tower.towers.id_embedding_tower import IdEmbeddingTower  # noqa: E402
from two_tower.towers.sequence_tower import SequenceTower  # noqa: E402

__all__ = [
    "BruteForceIndex",
    "FactorizedTopK",
    "FaissIndex",
    "FeatureTower",
    "HashedEmbedding",
    "HistoryTower",
    "IdEmbeddingTower",
    "InteractionLog",
    "QuotientRemainderEmbedding",
    "RowWiseAdagrad",
    "SequenceTower",
    "SparseEmbedding",
    "TwoTowerRetrieval",
    "Vocabulary",
    "baselines",
    "datasets",
    "defaults",
    "distribution",
    "evaluation",
    "losses",
    "negatives",
    "saving",
    "__version__",
]
