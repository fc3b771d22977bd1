"""The exact index's catalogue in host memory: one copy, filled block by block.

A catalogue arrives as one array or as an iterable of row blocks (a generator,
a `tf.data.Dataset`, the candidate tower's output batch by batch). Its rows are
copied into chunk buffers of the index's chunk width, allocated aligned to 64
bytes and zero-filled, so that:

- the whole catalogue is never held twice: no list of blocks to concatenate,
  no second array for the backend (the backends adopt each aligned buffer
  without a copy on CPU, see `two_tower.backends`' `host_tensor`);
- the search reads each chunk as it is, with no per-step slice or padding of
  the last chunk (its rows past the catalogue are already zeros);
- saving and loading stream the rows through a `.npy` file a block at a time.

Transient memory is one block, plus one chunk while the first chunk grows
(its capacity doubles until it reaches the chunk width, so a small catalogue
does not reserve a full chunk).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from keras import ops

ALIGN = 64  # bytes: what JAX's and TensorFlow's CPU runtimes need to share memory
BLOCK_ROWS = 2**16  # rows per block when an array or a file is cut into blocks


def aligned_zeros(rows: int, dim: int, dtype: Any) -> np.ndarray:
    """A zero `[rows, dim]` array whose data starts on a 64-byte boundary.

    NumPy's allocator aligns to 16 bytes. The zeros come from `calloc`, so pages
    that are never written are never resident.
    """
    dtype = np.dtype(dtype)
    nbytes = rows * dim * dtype.itemsize
    raw = np.zeros(nbytes + ALIGN, np.uint8)
    offset = -raw.ctypes.data % ALIGN
    return raw[offset : offset + nbytes].view(dtype).reshape(rows, dim)


class ChunkStore:
    """Catalogue rows in equal zero-padded chunks; row r is in chunk r // width.

    Args:
        chunks: `[width, dim]` buffers, rows past `num_rows` all zeros.
        num_rows: the catalogue's rows.
    """

    def __init__(self, chunks: tuple[np.ndarray, ...], num_rows: int) -> None:
        self.chunks = chunks
        self.num_rows = num_rows
        self.width, self.dim = chunks[0].shape
        self.dtype = chunks[0].dtype

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_rows, self.dim

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.dim * self.dtype.itemsize

    def pieces(self) -> Iterator[np.ndarray]:
        """The catalogue's rows, chunk by chunk, as views."""
        for number, chunk in enumerate(self.chunks):
            yield chunk[: min(self.width, self.num_rows - number * self.width)]

    def __getitem__(self, rows: slice) -> np.ndarray:
        """Rows `start:stop` (a view inside one chunk, else a copy)."""
        start, stop, step = rows.indices(self.num_rows)
        if step != 1:
            raise ValueError("ChunkStore takes contiguous row slices only.")
        parts = []
        for number, chunk in enumerate(self.chunks):
            first = number * self.width
            low, high = max(start, first), min(stop, first + self.width, self.num_rows)
            if low < high:
                parts.append(chunk[low - first : high - first])
        if not parts:
            return np.zeros((0, self.dim), self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def blocks_of(candidate_embeddings: Any) -> tuple[Iterable[Any], int | None]:
    """`(blocks, rows if known)`: an array cut into views, or the iterable as is.

    A Python list or tuple whose first item is a 2-D block (or an `(embeddings,
    ids)` pair) is a list of blocks, not one array: a 3-D catalogue is never
    valid, and NumPy would stack equal blocks into one (or fail on ragged ones).

    Raises:
        ValueError: `candidate_embeddings` is one `(embeddings, ids)` pair, a
            mapping, a string or None.
    """
    if isinstance(candidate_embeddings, (Mapping, str, bytes)) or candidate_embeddings is None:
        raise ValueError(
            "`candidate_embeddings` must be a numeric [candidates, dim] array, or row blocks "
            f"of one. Received a {type(candidate_embeddings).__name__}"
        )
    if is_batches(candidate_embeddings):
        return candidate_embeddings, None
    if isinstance(candidate_embeddings, (list, tuple)) and candidate_embeddings:
        first = candidate_embeddings[0]
        if (
            isinstance(candidate_embeddings, tuple)
            and len(candidate_embeddings) == 2
            and _ndim(first) == 2
            and _ndim(candidate_embeddings[1]) == 1
        ):
            raise ValueError(
                "`candidate_embeddings` is one (embeddings, ids) pair. Pass "
                "`index(embeddings, candidate_ids=ids)`, or a list of such pairs, one per "
                "block of rows."
            )
        # A pair's embeddings are 2-D: a list of 2-tuples of numbers is one dim-2 array.
        is_pair = isinstance(first, tuple) and len(first) == 2 and _ndim(first[0]) == 2
        if _ndim(first) == 2 or is_pair:
            return iter(candidate_embeddings), None
    if isinstance(candidate_embeddings, np.ndarray):
        array = candidate_embeddings  # no copy: catalogues can be gigabytes
    else:
        array = np.asarray(ops.convert_to_numpy(candidate_embeddings))
    if array.ndim != 2:
        return [array], None  # `assemble` names the shape
    rows = len(array)
    return (array[i : i + BLOCK_ROWS] for i in range(0, rows, BLOCK_ROWS)), rows


def _ndim(value: Any) -> int:
    """Dimensions of an array, tensor or nested list, read from its first items only."""
    ndim = getattr(value, "ndim", None)
    if isinstance(ndim, int):
        return ndim
    if isinstance(value, (list, tuple)):
        return 1 + (_ndim(value[0]) if value else 0)
    return 0


def is_batches(value: Any) -> bool:
    """Whether `value` is a dataset, generator or other iterable of batches (or blocks),
    not an array-like or a dict of them: what the model and the index read batch by batch."""
    if isinstance(value, (np.ndarray, list, tuple, Mapping, str, bytes)):
        return False
    return hasattr(value, "__iter__") and not hasattr(value, "__array__")


def assemble(
    blocks: Iterable[Any], chunk_size: int, block: int, dtype: Any, rows_hint: int | None = None
) -> tuple[ChunkStore, np.ndarray | None]:
    """Copies row blocks into chunk buffers; returns the store and the ids, if given.

    Each item of `blocks` is a `[rows, dim]` array-like, or a pair
    `(embeddings, ids)` (then every item is a pair, and the ids are returned).

    Args:
        blocks: the catalogue, in row order.
        chunk_size: most rows per chunk; the chunk width rounds it up to `block`.
        block: chunk widths are multiples of this.
        dtype: the stored dtype (the index's compute dtype).
        rows_hint: the total rows, when known, to size the first chunk at once.

    Raises:
        ValueError: no rows; a block that is not numeric, not 2-D, of another
            dim than the first, or holds NaN or infinity; pairs mixed with
            plain blocks; pairs whose ids are integers in one block and strings
            in another.
    """
    full_width = -(-chunk_size // block) * block
    chunks: list[np.ndarray] = []
    buffer: np.ndarray | None = None
    fill = rows = 0
    dim: int | None = None
    ids: list[np.ndarray] = []
    paired: bool | None = None
    for number, item in enumerate(blocks):
        is_pair = isinstance(item, tuple) and len(item) == 2
        if paired is not None and is_pair != paired:
            raise ValueError(
                "Catalogue blocks must all be arrays or all be (embeddings, ids) pairs. "
                f"Block {number} differs from the first."
            )
        paired = is_pair
        if is_pair:
            item, block_ids = item
            ids.append(_block_ids(block_ids, number, next((i for i in ids if len(i)), None)))
        array = checked_block(item, number, dim)
        if dim is None:
            dim = array.shape[1]
        if is_pair and len(ids[-1]) != len(array):
            raise ValueError(
                f"Catalogue block {number} has {len(array)} embeddings but {len(ids[-1])} ids."
            )
        start = 0
        while start < len(array):
            if buffer is None:
                wanted = rows_hint if rows_hint else len(array)
                buffer = aligned_zeros(min(full_width, _round_up(wanted, block)), dim, dtype)
            elif fill == len(buffer) and len(buffer) < full_width:
                # The first chunk grows (doubling) until it is a full chunk.
                needed = _round_up(fill + len(array) - start, block)
                grown = aligned_zeros(min(full_width, max(2 * len(buffer), needed)), dim, dtype)
                grown[:fill] = buffer[:fill]
                buffer = grown
            elif fill == len(buffer):
                chunks.append(buffer)
                buffer, fill = aligned_zeros(full_width, dim, dtype), 0
            count = min(len(buffer) - fill, len(array) - start)
            buffer[fill : fill + count] = array[start : start + count]
            fill, start, rows = fill + count, start + count, rows + count
    if buffer is None or dim is None:
        raise ValueError("Cannot index an empty catalogue: 0 candidate embeddings.")
    if chunks:
        chunks.append(buffer)
    else:
        chunks = [buffer[: _round_up(rows, block)]]
    return ChunkStore(tuple(chunks), rows), (np.concatenate(ids) if paired else None)


def _block_ids(block_ids: Any, number: int, first: np.ndarray | None) -> np.ndarray:
    """The ids of block `number`, 1-D; integers as int64, of the first block's kind.

    Concatenating integer and string ids would silently turn the integers into
    strings, and int64 with uint64 ids into floats.
    """
    if not isinstance(block_ids, np.ndarray):
        block_ids = ops.convert_to_numpy(block_ids)
    array = np.asarray(block_ids).reshape(-1)
    if array.dtype.kind == "u":
        if len(array) and array.max() > np.iinfo("int64").max:
            raise ValueError(
                f"Integer ids must fit in int64. Catalogue block {number} has ids up to "
                f"{array.max()}."
            )
        array = array.astype("int64")
    elif array.dtype.kind == "i":
        array = array.astype("int64", copy=False)
    if first is not None and len(array):
        kinds = {"U": "string", "i": "integer"}
        kind, first_kind = array.dtype.kind, first.dtype.kind
        if kind != first_kind and {kind, first_kind} <= set(kinds):
            raise ValueError(
                f"Catalogue block {number} has {kinds[kind]} ids but the blocks before it "
                f"have {kinds[first_kind]} ids: the ids of every block must be of one kind."
            )
    return array


def checked_block(item: Any, number: int, dim: int | None) -> np.ndarray:
    """Block `number` as a numeric, 2-D, finite array of `dim` columns (if given)."""
    array = item if isinstance(item, np.ndarray) else np.asarray(ops.convert_to_numpy(item))
    if array.dtype.kind not in "iuf":
        kind = "" if isinstance(item, np.ndarray) else f" (a {type(item).__name__})"
        raise ValueError(
            "`candidate_embeddings` must be a numeric [candidates, dim] array, or row "
            f"blocks of one. Received dtype {array.dtype}{kind}"
            + (f" in block {number}" if number else "")
        )
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(
            "`candidate_embeddings` must be a 2D [candidates, dim] array with dim >= 1. "
            f"Received shape: {array.shape}" + (f" in block {number}" if number else "")
        )
    if dim is not None and array.shape[1] != dim:
        raise ValueError(
            f"Catalogue block {number} has dim {array.shape[1]}; the first block has dim {dim}."
        )
    # Row blocks: a whole-catalogue boolean mask would cost n × dim bytes.
    if not all(
        np.isfinite(array[i : i + BLOCK_ROWS]).all() for i in range(0, len(array), BLOCK_ROWS)
    ):
        raise ValueError(
            "`candidate_embeddings` contains NaN or infinite values: a diverged model, or, on "
            "JAX, an id outside a table's range inside a tower, which JAX gathers as a row "
            "of NaN (see the backends guide)."
        )
    return array


def _round_up(rows: int, block: int) -> int:
    return max(block, -(-rows // block) * block)


def write_npy(path: str | os.PathLike[str], store: ChunkStore) -> None:
    """Writes the store's rows as one `.npy` array, a chunk at a time."""
    header = {
        "descr": np.lib.format.dtype_to_descr(store.dtype),
        "fortran_order": False,
        "shape": store.shape,
    }
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        for piece in store.pieces():
            handle.write(np.ascontiguousarray(piece).data)


def npy_blocks(path: str | os.PathLike[str], rows: int = BLOCK_ROWS) -> Iterator[np.ndarray]:
    """The rows of a 2-D `.npy` file, `rows` at a time, read without mapping it.

    Raises:
        ValueError: the file is not a 2-D C-order array, or is truncated.
    """
    with open(path, "rb") as handle:
        major, _ = np.lib.format.read_magic(handle)
        read_header = (
            np.lib.format.read_array_header_1_0
            if major == 1
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(handle)
        if fortran_order or len(shape) != 2:
            raise ValueError(f"{path}: expected a 2-D C-order array, found shape {shape}.")
        num_rows, dim = shape
        for start in range(0, num_rows, rows):
            count = min(rows, num_rows - start) * dim
            block = np.fromfile(handle, dtype=dtype, count=count)
            if block.size != count:
                raise ValueError(f"{path} is truncated: it ends inside row {start}.")
            yield block.reshape(-1, dim)


def row_pieces(rows: Any) -> Iterator[np.ndarray]:
    """Row blocks of an array or a `ChunkStore`, without copying."""
    if isinstance(rows, ChunkStore):
        return rows.pieces()
    return (rows[i : i + BLOCK_ROWS] for i in range(0, len(rows), BLOCK_ROWS))


def take_rows(rows: Any, positions: np.ndarray) -> np.ndarray:
    """`rows[positions]` (sorted positions) from an array or a `ChunkStore`, as float32."""
    if not isinstance(rows, ChunkStore):
        return np.ascontiguousarray(rows[positions], dtype="float32")
    chunk_of = positions // rows.width
    parts = [rows.chunks[c][positions[chunk_of == c] - c * rows.width] for c in np.unique(chunk_of)]
    return np.ascontiguousarray(np.concatenate(parts), dtype="float32")
