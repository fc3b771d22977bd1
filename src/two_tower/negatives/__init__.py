"""Where a softmax's negatives and their sampling probabilities come from: a streaming
item-frequency estimate for the logQ correction (`FrequencyEstimator`), a cache of
recent batches' candidates (`NegativeCache`), popularity-proportional sampled
negatives (`PopularitySampler`)."""

from two_tower.negatives.frequency_estimator import FrequencyEstimator
from two_tower.negatives.negative_cache import NegativeCache
from two_tower.negatives.popularity_sampler import PopularitySampler

__all__ = ["FrequencyEstimator", "NegativeCache", "PopularitySampler"]
