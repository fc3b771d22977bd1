"""The integer hash that `HashedEmbedding` and `QuotientRemainderEmbedding` share.

Written with `keras.ops` on 32-bit words only, so that JAX without 64-bit mode
(Keras' default), TensorFlow and torch give the same buckets bit for bit:

1. `key`: the id's low 32 bits (`id mod 2**32`). JAX without x64 holds an int64
   id as exactly these bits (it wraps int64 arrays to int32), so the other
   backends drop the high bits too. Ids that differ by a multiple of `2**32`
   share every bucket.
2. `x = key XOR salt`, with `salt = fmix32(seed XOR ((index + 1) * 0x9E3779B9 mod 2**32))`
   for the `index`-th hash function (computed in Python).
3. `h = fmix32(x)`, MurmurHash3's 32-bit finalizer: `h ^= h >> 16;
   h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16` (unsigned,
   shifts logical, products mod `2**32`).
4. `bucket = (h mod 2**31) mod num_buckets`.

In int32, a product mod `2**32` is the wrapped int32 product on every backend,
a logical shift is an arithmetic shift with the sign bits masked off, and the
top bit is dropped before the modulo, so no step depends on how a backend
treats a negative operand.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from two_tower.sparse.sparse_embedding import SparseEmbedding
from two_tower.types import Tensor

GOLDEN = 0x9E3779B9
MULTIPLIERS = (0x85EBCA6B, 0xC2B2AE35)
MAX_BUCKETS = 2**31 - 1
MAX_SEED = 2**32 - 1
# Ids a hashing layer takes: every signed integer dtype, and unsigned ones whose
# values fit in int32. uint32 and uint64 are refused: torch lacks most of their
# ops, and JAX without x64 wraps uint64 to uint32.
ID_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16")


def _as_int32(word: int) -> int:
    """The int32 with the bits of the unsigned 32-bit `word`."""
    word &= 0xFFFFFFFF
    return word - 2**32 if word >= 2**31 else word


def fmix32_python(word: int) -> int:
    """MurmurHash3's finalizer on a Python int (for the salts)."""
    word &= 0xFFFFFFFF
    word ^= word >> 16
    word = (word * MULTIPLIERS[0]) & 0xFFFFFFFF
    word ^= word >> 13
    word = (word * MULTIPLIERS[1]) & 0xFFFFFFFF
    return word ^ (word >> 16)


def salts(seed: int, count: int) -> list[int]:
    """The unsigned 32-bit salt of each of `count` hash functions (step 2 above)."""
    return [fmix32_python(seed ^ (((index + 1) * GOLDEN) & 0xFFFFFFFF)) for index in range(count)]


def check_dtype(dtype: Any, owner: str, name: str) -> None:
    """Raises `ValueError` unless `dtype` is one of `ID_DTYPES`."""
    if isinstance(dtype, np.dtype) and dtype.kind in "USO":
        standard = {"U": "str", "S": "bytes", "O": "object"}[dtype.kind]
    else:
        try:
            standard = keras.backend.standardize_dtype(dtype)
        except ValueError:
            standard = str(dtype)
    if standard not in ID_DTYPES:
        raise ValueError(
            f"{owner} {name!r} takes integer ids (dtypes {', '.join(ID_DTYPES)}), any value "
            f"in the int64 range. Received ids of dtype {standard}. Strings are not hashed: "
            "map them to integers first (e.g. a 64-bit hash of each string), and do not "
            "pass floats as ids."
        )


def low_words(ids: Tensor) -> Tensor:
    """The low 32 bits of integer `ids`, as int32 (step 1 above)."""
    dtype = keras.backend.standardize_dtype(ids.dtype)
    if dtype != "int64":
        return ops.cast(ids, "int32")  # exact: every other accepted dtype fits in int32
    unsigned = ops.bitwise_and(ids, 0xFFFFFFFF)  # in [0, 2**32), in int64
    return ops.cast(ops.where(unsigned >= 2**31, unsigned - 2**32, unsigned), "int32")


def _logical_right_shift(words: Tensor, bits: int) -> Tensor:
    return ops.bitwise_and(ops.right_shift(words, bits), (1 << (32 - bits)) - 1)


def _constant(word: int) -> Tensor:
    return ops.convert_to_tensor(np.int32(_as_int32(word)), dtype="int32")


def fmix32(words: Tensor) -> Tensor:
    """MurmurHash3's finalizer on int32 `words` read as unsigned (step 3 above)."""
    words = ops.bitwise_xor(words, _logical_right_shift(words, 16))
    words = ops.multiply(words, _constant(MULTIPLIERS[0]))
    words = ops.bitwise_xor(words, _logical_right_shift(words, 13))
    words = ops.multiply(words, _constant(MULTIPLIERS[1]))
    return ops.bitwise_xor(words, _logical_right_shift(words, 16))


def bucket_ids(ids: Tensor, num_buckets: int, salt_words: list[int]) -> Tensor:
    """`[*ids.shape, len(salt_words)]` int32 buckets in `[0, num_buckets)` (steps 1-4)."""
    keys = low_words(ids)
    columns = []
    for salt in salt_words:
        hashed = fmix32(ops.bitwise_xor(keys, _constant(salt)))
        positive = ops.bitwise_and(hashed, 0x7FFFFFFF)
        columns.append(ops.mod(positive, ops.convert_to_tensor(num_buckets, dtype="int32")))
    return ops.stack(columns, axis=-1)


def check_call_input(ids: Any, owner: str, name: str) -> None:
    """Refuses NumPy-like `ids` of a dtype the layers do not hash, before Keras converts
    them (it would fail on strings in each backend's words, and JAX would wrap uint64)."""
    if isinstance(ids, (np.ndarray, list, tuple, np.generic, int, float, str, bytes)):
        check_dtype(np.asarray(ids).dtype, owner, name)


def table(
    sparse: bool,
    rows: int,
    width: int,
    l2: float,
    name: str,
    initializer: Any = "uniform",
) -> keras.layers.Layer:
    """A `[rows, width]` embedding table: `SparseEmbedding` when `sparse`, else Keras'."""
    regularizer = keras.regularizers.L2(l2) if l2 else None
    layer = SparseEmbedding if sparse else keras.layers.Embedding
    return layer(
        rows,
        width,
        embeddings_initializer=initializer,
        embeddings_regularizer=regularizer,
        name=name,
    )
