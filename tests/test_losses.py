import numpy as np
import pytest

import two_tower
from testing import assert_all_close


def numpy_softmax_loss(similarities, temperature, weights=None):
    logits = similarities.astype("float64") / temperature
    row_max = logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits - row_max).sum(axis=1)) + row_max[:, 0]
    per_example = log_z - np.diag(logits)
    if weights is not None:
        per_example = per_example * weights
    return per_example.mean()


@pytest.mark.parametrize("temperature", [1.0, 0.1, 5.0])
def test_in_batch_softmax_matches_numpy(temperature):
    rng = np.random.default_rng(0)
    similarities = rng.normal(size=(6, 6)).astype("float32") * 3
    loss = two_tower.losses.in_batch_softmax(similarities, temperature)
    assert_all_close(loss, numpy_softmax_loss(similarities, temperature), atol=1e-5)


def test_in_batch_softmax_sample_weight():
    rng = np.random.default_rng(1)
    similarities = rng.normal(size=(5, 5)).astype("float32")
    weights = rng.random(5).astype("float32")
    loss = two_tower.losses.in_batch_softmax(similarities, 0.5, weights)
    assert_all_close(loss, numpy_softmax_loss(similarities, 0.5, weights), atol=1e-5)


def test_in_batch_softmax_is_stable_for_large_logits():
    similarities = np.array([[1000.0, -1000.0], [0.0, 1000.0]], "float32")
    loss = two_tower.losses.in_batch_softmax(similarities, 0.01)
    assert np.isfinite(float(loss))
    assert_all_close(loss, numpy_softmax_loss(similarities, 0.01), atol=1e-4)


def test_mean_squared_error_matches_numpy():
    rng = np.random.default_rng(2)
    labels = rng.random(7).astype("float32")
    scores = rng.normal(size=7).astype("float32")
    weights = rng.random(7).astype("float32")
    assert_all_close(
        two_tower.losses.mean_squared_error(labels[:, None], scores),
        np.mean((labels - scores) ** 2),
    )
    assert_all_close(
        two_tower.losses.mean_squared_error(labels, scores, weights),
        np.mean(weights * (labels - scores) ** 2),
    )


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_bad_temperature_raises(temperature):
    with pytest.raises(ValueError, match="temperature"):
        two_tower.losses.in_batch_softmax(np.eye(3, dtype="float32"), temperature)


def test_non_square_similarities_raise():
    with pytest.raises(ValueError, match="square"):
        two_tower.losses.in_batch_softmax(np.ones((2, 3), "float32"))


def numpy_retrieval_softmax(
    similarities,
    positives=None,
    temperature=1.0,
    candidate_ids=None,
    log_q=None,
    num_hard_negatives=None,
    weights=None,
):
    """Row-by-row float64 reference, written independently of the library."""
    similarities = np.asarray(similarities, "float64")
    rows, columns = similarities.shape
    positives = np.arange(rows) if positives is None else np.asarray(positives)
    losses = []
    for row in range(rows):
        logits = similarities[row] / temperature
        if log_q is not None:
            logits = logits - np.asarray(log_q, "float64")
        keep = np.ones(columns, bool)
        if candidate_ids is not None:
            keep &= candidate_ids != candidate_ids[positives[row]]
        keep[positives[row]] = False  # the negatives
        negatives = logits[keep]
        if num_hard_negatives is not None:
            negatives = np.sort(negatives)[::-1][:num_hard_negatives]
        kept = np.concatenate([[logits[positives[row]]], negatives])
        top = kept.max()
        losses.append(np.log(np.exp(kept - top).sum()) + top - logits[positives[row]])
    losses = np.asarray(losses)
    if weights is not None:
        losses = losses * weights
    return losses.mean()


def random_case(rows=6, columns=6, seed=0):
    rng = np.random.default_rng(seed)
    similarities = rng.normal(size=(rows, columns)).astype("float32") * 2
    ids = rng.integers(0, 4, columns)  # few ids: many accidental hits
    return rng, similarities, ids


@pytest.mark.parametrize("temperature", [1.0, 0.2])
@pytest.mark.parametrize("remove_accidental_hits", [False, True])
@pytest.mark.parametrize("logq", [False, True])
@pytest.mark.parametrize("num_hard_negatives", [None, 1, 3])
def test_in_batch_variants_match_numpy(
    temperature, remove_accidental_hits, logq, num_hard_negatives
):
    rng, similarities, ids = random_case()
    log_q = np.log(rng.uniform(0.01, 0.5, 6)).astype("float32") if logq else None
    weights = rng.random(6).astype("float32")
    loss = two_tower.losses.retrieval_softmax(
        similarities,
        temperature=temperature,
        candidate_ids=ids if remove_accidental_hits else None,
        log_candidate_probability=log_q,
        num_hard_negatives=num_hard_negatives,
        sample_weight=weights,
    )
    expected = numpy_retrieval_softmax(
        similarities,
        temperature=temperature,
        candidate_ids=ids if remove_accidental_hits else None,
        log_q=log_q,
        num_hard_negatives=num_hard_negatives,
        weights=weights,
    )
    assert_all_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_mixed_negatives_match_numpy():
    # 5 in-batch candidates followed by 7 uniformly sampled extra negatives.
    rng, similarities, ids = random_case(rows=5, columns=12, seed=3)
    log_q = np.log(np.full(12, 1 / 50)).astype("float32")
    loss = two_tower.losses.retrieval_softmax(
        similarities, candidate_ids=ids, log_candidate_probability=log_q, temperature=0.5
    )
    expected = numpy_retrieval_softmax(
        similarities, candidate_ids=ids, log_q=log_q, temperature=0.5
    )
    assert_all_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_full_catalogue_softmax_matches_numpy():
    rng, similarities, _ = random_case(rows=4, columns=20, seed=4)
    positives = np.array([3, 19, 0, 3])
    loss = two_tower.losses.retrieval_softmax(similarities, positives, temperature=0.7)
    expected = numpy_retrieval_softmax(similarities, positives, temperature=0.7)
    assert_all_close(loss, expected, atol=1e-5, rtol=1e-5)
    full = similarities.astype("float64") / 0.7
    by_hand = np.mean(np.log(np.exp(full).sum(axis=1)) - full[np.arange(4), positives])
    assert_all_close(loss, by_hand, atol=1e-5, rtol=1e-5)


def test_accidental_hits_are_really_masked():
    # Row 0's positive (id 7) also sits in column 1 with a huge score. Masked, it
    # must not count: the loss equals the loss without that column.
    similarities = np.array([[1.0, 50.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], "float32")
    ids = np.array([7, 7, 9])
    masked = two_tower.losses.retrieval_softmax(similarities, candidate_ids=ids)
    unmasked = two_tower.losses.retrieval_softmax(similarities)
    row0 = np.log(np.exp(1.0) + np.exp(0.0)) - 1.0
    row1 = np.log(np.exp(1.0) + np.exp(0.0)) - 1.0  # column 0 is also id 7: masked
    row2 = np.log(2 * np.exp(0.0) + np.exp(1.0)) - 1.0
    assert_all_close(masked, np.mean([row0, row1, row2]), atol=1e-5)
    assert float(unmasked) > 10  # without masking, the duplicate dominates row 0


def test_in_batch_softmax_equals_retrieval_softmax_default():
    _, similarities, _ = random_case(seed=5)
    assert_all_close(
        two_tower.losses.in_batch_softmax(similarities, 0.3),
        two_tower.losses.retrieval_softmax(similarities, temperature=0.3),
        atol=1e-6,
    )


@pytest.mark.parametrize("num_hard_negatives", [0, -2, 1.5, True])
def test_bad_num_hard_negatives_raises(num_hard_negatives):
    with pytest.raises(ValueError, match="num_hard_negatives"):
        two_tower.losses.retrieval_softmax(
            np.eye(3, dtype="float32"), num_hard_negatives=num_hard_negatives
        )


def test_too_few_columns_for_in_batch_raises():
    with pytest.raises(ValueError, match="at least as many columns as rows"):
        two_tower.losses.retrieval_softmax(np.ones((4, 2), "float32"))
