"""MovieLens in compact form: ratings as index columns, one feature table per entity."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

VARIANTS = ("100k", "1m", "20m", "25m")
RATING_COLUMNS = ("user_index", "movie_index", "user_rating", "timestamp")
_RATING_DTYPES = {
    "user_index": np.int32,
    "movie_index": np.int32,
    "user_rating": np.float32,
    "timestamp": np.int64,
}


def _check_table(name: str, table: Any, required: tuple[str, ...]) -> int:
    """Raises unless `table` is a dict of equal-length 1-D arrays holding `required`."""
    if not isinstance(table, dict) or not table:
        raise ValueError(
            f"`{name}` must be a non-empty dict of 1-D NumPy arrays. "
            f"Received: {type(table).__name__}"
        )
    missing = [key for key in required if key not in table]
    if missing:
        raise ValueError(f"`{name}` lacks the columns {missing}. Received: {sorted(table)}")
    lengths = {key: np.shape(values) for key, values in table.items()}
    if any(len(shape) != 1 for shape in lengths.values()) or len(set(lengths.values())) != 1:
        raise ValueError(
            f"The columns of `{name}` must be 1-D arrays of one length. Received shapes {lengths}"
        )
    return int(next(iter(lengths.values()))[0])


@dataclasses.dataclass(frozen=True, eq=False)
class MovieLensTables:
    """MovieLens in compact form: integer and float rating columns, entity tables.

    One row per rating holds only two indices, the rating and its time (20
    bytes), so MovieLens 25M takes 0.5 GB instead of the tens of GB that the
    tfds layout (title, genres and user features repeated in every row) needs.
    Towers join the entity tables by index: `user_index` and `movie_index` are
    row numbers of `users` and `movies`, so they serve directly as the ids of
    `TwoTowerRetrieval.from_ids(len(users), len(movies))`, and row i of a movie
    column describes candidate id i (what `TwoTowerRetrieval.set_catalogue`
    expects, once encoded as numbers).

    `movielens.load_tables(variant=...)` builds it; `to_records` gives back the
    tfds-identical layout for all ratings or a subset.

    Attributes:
        variant: `"100k"`, `"1m"`, `"20m"` or `"25m"`.
        ratings: `user_index`, `movie_index` (int32), `user_rating` (float32)
            and `timestamp` (int64), in file order.
        movies: one row per movie of the movies file, in file order:
            `movie_id`, `movie_title` (str) and `movie_genres` (object array of
            int64 arrays of `movielens.GENRES` labels).
        users: `user_id` (str), and for 100k and 1m the tfds demographic
            features (`bucketized_user_age`, `user_gender`,
            `user_occupation_label`, `user_occupation_text`, `user_zip_code`;
            100k also `raw_user_age`), in the users file's order. 20M and 25M
            have no users file: their users are those who rated, by id.

    Raises:
        ValueError: an unknown `variant`; a table is not a dict of equal-length
            1-D arrays or lacks a column; an index column is not integers, or
            points outside its table.

    Examples:
        >>> import numpy as np
        >>> tables = two_tower.datasets.MovieLensTables(
        ...     variant="100k",
        ...     ratings={"user_index": np.array([0, 1]), "movie_index": np.array([1, 1]),
        ...              "user_rating": np.array([5.0, 3.0]), "timestamp": np.array([7, 9])},
        ...     movies={"movie_id": np.array(["10", "20"])},
        ...     users={"user_id": np.array(["1", "2"])})
        >>> tables.to_records()["movie_id"].tolist()
        ['20', '20']
    """

    variant: str
    ratings: dict[str, np.ndarray]
    movies: dict[str, np.ndarray]
    users: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {VARIANTS}. Received: {self.variant!r}")
        _check_table("ratings", self.ratings, RATING_COLUMNS)
        sizes = {
            "user_index": _check_table("users", self.users, ("user_id",)),
            "movie_index": _check_table("movies", self.movies, ("movie_id",)),
        }
        ratings = dict(self.ratings)
        for key, dtype in _RATING_DTYPES.items():
            values = np.asarray(ratings[key])
            if key in sizes:
                if values.dtype.kind not in "iu":
                    raise ValueError(
                        f"ratings[{key!r}] must hold integers. Received dtype {values.dtype}"
                    )
                outside = (values < 0) | (values >= sizes[key])
                if outside.any():
                    row = int(np.argmax(outside))
                    table = "users" if key == "user_index" else "movies"
                    raise ValueError(
                        f"ratings[{key!r}] must index rows of `{table}` (0 to "
                        f"{sizes[key] - 1}); rating {row} holds {values[row]}."
                    )
            ratings[key] = values.astype(dtype, copy=False)
        object.__setattr__(self, "ratings", ratings)

    @property
    def num_ratings(self) -> int:
        """The number of ratings."""
        return len(self.ratings["user_index"])

    @property
    def num_users(self) -> int:
        """The number of rows of `users`."""
        return len(self.users["user_id"])

    @property
    def num_movies(self) -> int:
        """The number of rows of `movies`."""
        return len(self.movies["movie_id"])

    def records_nbytes(self, rows: Any = None) -> int:
        """The bytes `to_records(rows)` would take (object arrays count their pointers)."""
        count = self.num_ratings if rows is None else len(self._rows(rows))
        tables = (self.ratings, self.movies, self.users)
        per_row = sum(
            np.asarray(values).dtype.itemsize
            for table in tables
            for key, values in table.items()
            if key not in ("user_index", "movie_index")
        )
        return count * per_row

    def to_records(self, rows: Any = None) -> dict[str, np.ndarray]:
        """The ratings in the tfds layout: every movie and user column joined per rating.

        Args:
            rows: which ratings, as anything that indexes a NumPy array (a
                slice, integer positions, a boolean mask); None takes all.

        Returns:
            A dict of equal-length arrays keyed by the tfds feature names, in
            sorted order, as `movielens.load_ratings` returns them.

        Raises:
            ValueError: `rows` that do not index the ratings.

        Examples:
            >>> tables = two_tower.datasets.movielens.load_tables()  # doctest: +SKIP
            >>> first = tables.to_records(slice(0, 1000))  # doctest: +SKIP
        """
        positions = self._rows(rows)
        users = self.ratings["user_index"][positions]
        movies = self.ratings["movie_index"][positions]
        records = {key: values[movies] for key, values in self.movies.items()}
        records.update({key: values[users] for key, values in self.users.items()})
        records["user_rating"] = self.ratings["user_rating"][positions]
        records["timestamp"] = self.ratings["timestamp"][positions]
        return {key: records[key] for key in sorted(records)}

    def _rows(self, rows: Any) -> np.ndarray:
        everything = np.arange(self.num_ratings)
        if rows is None:
            return everything
        try:
            return everything[rows]
        except (IndexError, TypeError) as error:
            raise ValueError(
                f"`rows` must index the {self.num_ratings} ratings (a slice, integer "
                f"positions or a boolean mask). Received: {rows!r} ({error})"
            ) from None
