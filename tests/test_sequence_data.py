"""Sequence data: reading a "user item [time]" file, leave-one-out and temporal splits,
and SequenceDataset's packed rows, each against plain Python."""

import dataclasses
from collections import Counter, defaultdict

import numpy as np
import pytest

import two_tower


def random_log(seed=0, users=40, size=400, items=30):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, users, size),
        rng.integers(0, items, size),
        rng.integers(0, 60, size),  # many ties in time
    )


def python_sequences(users, items, times):
    """Each user's items in time order, ties in the order given (the log's rule)."""
    rows = defaultdict(list)
    for position, (user, item, when) in enumerate(zip(users, items, times, strict=True)):
        rows[int(user)].append((int(when), position, int(item), int(when)))
    return {user: [(item, when) for _, _, item, when in sorted(r)] for user, r in rows.items()}


# ---------------------------------------------------------------- reading files
def test_read_two_columns_uses_the_line_order_as_time(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("1 10\n2 11\n\n1 12\n")
    data = two_tower.datasets.read_interactions(path)
    assert data["users"].tolist() == [1, 2, 1]
    assert data["items"].tolist() == [10, 11, 12]
    assert data["times"].tolist() == [0, 1, 2]
    assert data["items"].dtype == np.int64


def test_read_three_columns_and_string_ids(tmp_path):
    path = tmp_path / "log.tsv"
    path.write_text("ann\tx\t1.5\nbob\ty\t0.25\n")
    data = two_tower.datasets.read_interactions(str(path))
    assert data["users"].tolist() == ["ann", "bob"]
    assert data["items"].tolist() == ["x", "y"]
    assert data["times"].tolist() == [1.5, 0.25]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty file"),
        ("1 2\n1 2 3\n", "Line 2"),
        ("1\n", "Line 1 .* 1 fields"),
        ("1 2 3 4\n", "4 fields"),
        ("1 2 soon\n", "times as numbers"),
    ],
)
def test_read_bad_files(tmp_path, text, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        two_tower.datasets.read_interactions(path)


def test_read_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        two_tower.datasets.read_interactions(tmp_path / "nothing.txt")


# -------------------------------------------------------------------- splits
def triples(queries):
    return list(
        zip(queries.users.tolist(), queries.times.tolist(), queries.items.tolist(), strict=True)
    )


def test_leave_one_out_matches_python():
    users, items, times = random_log()
    log = two_tower.InteractionLog(users, items, times)
    train, validation, test = log.leave_one_out(min_interactions=4)
    expected_train, expected_valid, expected_test = Counter(), [], []
    for user, rows in sorted(python_sequences(users, items, times).items()):
        if len(rows) >= 4:
            expected_valid.append((user, rows[-2][1], rows[-2][0]))
            expected_test.append((user, rows[-1][1], rows[-1][0]))
            rows = rows[:-2]
        expected_train.update((user, item, when) for item, when in rows)
    got_train, got_offsets, got_items = train.sequences()
    assert len(train) == sum(expected_train.values())
    assert triples(validation) == expected_valid
    assert triples(test) == expected_test
    assert len(test) == len(expected_test)
    # The training log holds exactly the rest, per user in time order.
    rest = python_sequences(
        *zip(*[(u, i, t) for (u, i, t), n in expected_train.items() for _ in range(n)], strict=True)
    )
    for position, user in enumerate(got_train.tolist()):
        found = got_items[got_offsets[position] : got_offsets[position + 1]].tolist()
        assert sorted(found) == sorted(item for item, _ in rest[user])


def test_leave_one_out_histories_are_what_came_before():
    log = two_tower.InteractionLog(
        np.array([7, 7, 7, 7, 8]), np.array([1, 2, 3, 4, 5]), np.array([1, 2, 3, 4, 1])
    )
    train, validation, test = log.leave_one_out()
    assert validation.histories(log, 3).tolist() == [[2, 1, -1]]
    assert test.histories(log, 3).tolist() == [[3, 2, 1]]
    assert len(train) == 3 and train.num_users == 2
    with pytest.raises(ValueError, match="min_interactions"):
        log.leave_one_out(min_interactions=1)
    fewer = dataclasses.replace(test, items=test.items + 1)  # frozen, yet replaceable
    assert fewer.items.tolist() == [5] and len(fewer) == 1


def test_temporal_split_matches_python():
    users, items, times = random_log(seed=1)
    log = two_tower.InteractionLog(users, items, times)
    train, validation, test = log.temporal_split(20, 45)
    assert len(train) == int((times < 20).sum())
    expected = sorted(
        (int(u), int(t), int(i))
        for u, i, t in zip(users, items, times, strict=True)
        if 20 <= t < 45
    )
    assert sorted(triples(validation)) == expected
    assert len(test) == int((times >= 45).sum())
    assert np.all(test.times >= 45)
    with pytest.raises(ValueError, match="must not come before"):
        log.temporal_split(10, 5)


def test_sequences_are_read_only_views():
    log = two_tower.InteractionLog(np.array([2, 1, 2]), np.array([5, 6, 7]), np.array([3, 1, 2]))
    users, offsets, items = log.sequences()
    assert users.tolist() == [1, 2] and offsets.tolist() == [0, 1, 3]
    assert items.tolist() == [6, 7, 5]
    with pytest.raises(ValueError):
        items[0] = 1


# ----------------------------------------------------------- SequenceDataset
def expected_segments(users, items, times, width):
    """Every (inputs, targets) piece, cut from the most recent back, in plain Python."""
    pieces = []
    for rows in python_sequences(users, items, times).values():
        sequence = [item for item, _ in rows]
        end = len(sequence) - 1  # one past the last input
        while end > 0:
            start = max(0, end - width)
            pieces.append((tuple(sequence[start:end]), tuple(sequence[start + 1 : end + 1])))
            end = start
    return Counter(pieces)


def read_back(data):
    """The (inputs, targets) segments of every batch, checking each row's layout."""
    found = Counter()
    for index in range(len(data)):
        batch = data[index]
        sequence = batch["query"]["sequence"]
        segment = batch["query"]["segment"]
        target = batch["candidate"]
        assert sequence.shape == segment.shape == target.shape
        assert sequence.shape[1] == data.max_length and len(sequence) <= data.batch_size
        for row in range(len(sequence)):
            numbers = segment[row]
            present = numbers > 0
            assert np.all((sequence[row] < 0) == ~present) and np.all((target[row] < 0) == ~present)
            seen = []
            for number in numbers[present]:
                if not seen or seen[-1] != number:
                    seen.append(number)
            assert seen == list(range(1, len(seen) + 1))  # runs numbered 1, 2, ...
            for number in seen:
                columns = np.flatnonzero(numbers == number)
                assert np.all(np.diff(columns) == 1)
                found[(tuple(sequence[row, columns]), tuple(target[row, columns]))] += 1
    return found


@pytest.mark.parametrize("width", [3, 8])
def test_every_target_once_in_its_piece(width):
    users, items, times = random_log(seed=2)
    log = two_tower.InteractionLog(users, items, times)
    data = two_tower.datasets.SequenceDataset(log, max_length=width, batch_size=4)
    assert read_back(data) == expected_segments(users, items, times, width)
    assert data.num_targets == sum(n - 1 for n in np.bincount(users) if n > 1)


def test_packing_fills_rows():
    users, items, times = random_log(seed=3, users=300, size=3000)
    log = two_tower.InteractionLog(users, items, times)
    data = two_tower.datasets.SequenceDataset(log, max_length=20, batch_size=8)
    # Best fit decreasing fills the rows (one user per row would fill 45% here).
    assert data.num_targets / (data.num_rows * 20) > 0.95
    assert len(data) == -(-data.num_rows // 8)


def test_shuffle_is_seeded_and_changes_each_epoch():
    users, items, times = random_log(seed=4)
    log = two_tower.InteractionLog(users, items, times)

    def first_batch(data):
        return data[0]["candidate"].tolist()

    one = two_tower.datasets.SequenceDataset(log, max_length=5, batch_size=3, seed=7)
    two = two_tower.datasets.SequenceDataset(log, max_length=5, batch_size=3, seed=7)
    assert first_batch(one) == first_batch(two)
    before = first_batch(one)
    one.on_epoch_end()
    assert first_batch(one) != before
    assert read_back(one) == read_back(two)  # the same rows, another order
    fixed = two_tower.datasets.SequenceDataset(log, max_length=5, batch_size=3, shuffle=False)
    order = first_batch(fixed)
    fixed.on_epoch_end()
    assert first_batch(fixed) == order


def test_sequence_dataset_bad_input():
    log = two_tower.InteractionLog(np.array([1, 2]), np.array([3, 4]), np.array([0, 0]))
    with pytest.raises(ValueError, match="no user in the log has two interactions"):
        two_tower.datasets.SequenceDataset(log, max_length=4)
    with pytest.raises(ValueError, match="InteractionLog"):
        two_tower.datasets.SequenceDataset({"users": [1]}, max_length=4)
    log = two_tower.InteractionLog(np.array([1, 1]), np.array([3, 4]), np.array([0, 1]))
    with pytest.raises(ValueError, match="max_length"):
        two_tower.datasets.SequenceDataset(log, max_length=0)
    data = two_tower.datasets.SequenceDataset(log, max_length=4)
    with pytest.raises(IndexError, match="out of range"):
        data[1]


def test_sampling_probability_is_the_chance_of_appearing_in_a_batch():
    users, items, times = random_log(seed=5)
    log = two_tower.InteractionLog(users, items, times)
    data = two_tower.datasets.SequenceDataset(
        log, max_length=6, batch_size=3, sampling_probability=True
    )
    targets = [t for (_, targets), n in expected_segments(users, items, times, 6).items()
               for _ in range(n) for t in targets]  # fmt: skip
    frequency = np.bincount(targets, minlength=30) / len(targets)
    per_batch = len(targets) * 3 / data.num_rows  # targets in a batch of 3 rows, on average
    expected = 1 - (1 - frequency) ** per_batch
    for index in range(len(data)):
        batch = data[index]
        target = batch["candidate"]
        probability = batch["candidate_sampling_probability"]
        assert probability.shape == target.shape and probability.dtype == np.float32
        np.testing.assert_allclose(
            probability[target >= 0], expected[target[target >= 0]], rtol=1e-5
        )
        np.testing.assert_array_equal(probability[target < 0], 1.0)
    assert (
        "candidate_sampling_probability"
        not in two_tower.datasets.SequenceDataset(log, max_length=6)[0]
    )


def test_for_sequences_takes_the_defaults_and_overrides():
    model = two_tower.TwoTowerRetrieval.for_sequences(
        50, **{**two_tower.defaults.SEQUENCE, "num_blocks": 1, "loss": "softmax"}, name="next"
    )
    assert model.name == "next" and model.loss_name == "softmax"
    assert model.query_tower.num_blocks == 1 and model.catalogue_size is None
    assert model.query_tower.max_length == two_tower.defaults.SEQUENCE["max_length"]
    default = two_tower.TwoTowerRetrieval.for_sequences(50)
    assert default.loss_name == two_tower.defaults.SEQUENCE["loss"]
    assert default.query_tower.item_table is default.candidate_tower.embedding
    with pytest.raises(TypeError, match="builds"):
        two_tower.TwoTowerRetrieval.for_sequences(50, candidate_tower=None)
