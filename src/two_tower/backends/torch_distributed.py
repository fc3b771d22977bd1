"""Data-parallel training over a torch process group (`torchrun`), for `backends/torch.py`.

Keras 3.15 has no `keras.distribution` for torch, and Keras' guide for several
GPUs wraps the model in `torch.nn.parallel.DistributedDataParallel`, which
averages dense gradients only: it knows nothing of `SparseEmbedding`'s
row-sparse gradients (not parameters' `.grad`), nor of in-batch negatives,
which on each process would come from that process's rows only. So the
library's own torch steps speak to `torch.distributed` themselves, with the
same collectives on every backend of the process group (gloo on CPU, NCCL on
GPU):

- each process trains on its share of every global batch: `fit` on arrays cuts
  the rank's block of each batch (`local_rows`); a dataset gives each process
  its own batches;
- the retrieval loss scales each process's mean to its share of the global
  rows (`replica_loss`: one all-reduce of a scalar), so summed gradients are
  the gradient of the global batch's mean, uneven last batch included;
- in-batch softmax scores against every process's candidates: their
  embeddings are all-gathered with gradients (`global_negatives`), the ids,
  logQ and masks without (`all_replicas`);
- after `backward()`, dense gradients are summed in one all-reduce of one flat
  buffer (the logged loss and the batch's rows ride along), and each
  `SparseEmbedding` lookup's ids and row gradients are all-gathered, so every
  process applies the same sparse update of the global batch's rows
  (`reduce_gradients`, `gather_rows`);
- at the first step of each `fit`, every variable (model and optimizer) is
  broadcast from rank 0 (`broadcast_state`), as `DistributedDataParallel`
  does when it wraps a model.

Every process then holds the same weights, equal to one process training on
the global batches within float32 rounding (`tests/test_multidevice_torch.py`).
Outside `fit`'s and `train_on_batch`'s steps nothing here communicates:
`evaluate`, `predict` and serving run whole on each process.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import torch
import torch.distributed as dist

_STATE = threading.local()


def world_size() -> int:
    """Processes in the default process group (1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return int(dist.get_rank()) if world_size() > 1 else 0


def in_step() -> bool:
    """Whether a training step over several processes is running on this thread."""
    return bool(getattr(_STATE, "active", False))


@contextlib.contextmanager
def training_step() -> Iterator[bool]:
    """Held around a train step: the hooks here communicate inside it (when the
    group has several processes, which it yields)."""
    several = world_size() > 1
    previous = in_step()
    _STATE.active = several
    try:
        yield several
    finally:
        _STATE.active = previous


def _every_process(values: Sequence[int], device: torch.device) -> list[list[int]]:
    """Every process's `values` (as many on each), in rank order: one all-gather."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(every, mine)
    return torch.stack(every).tolist()


def _counts(rows: int, device: torch.device) -> list[int]:
    """Every process's `rows`, in rank order."""
    return [row[0] for row in _every_process([rows], device)]


def _gather_padded(values: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Every process's `values` (rows `counts[r]` on rank r), concatenated on axis 0."""
    longest = max(counts)
    if values.shape[0] < longest:
        padding = values.new_zeros((longest - values.shape[0], *values.shape[1:]))
        values = torch.cat([values, padding])
    parts = [torch.empty_like(values) for _ in counts]
    dist.all_gather(parts, values.contiguous())
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])


class _GatherWithGradient(torch.autograd.Function):
    """All-gather on axis 0 whose gradient is the sum, over processes, of the
    gradients of this process's rows (each process's loss scores every row)."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, counts: list[int], offset: int) -> torch.Tensor:
        ctx.rows = (offset, values.shape[0])
        return _gather_padded(values.detach(), counts)

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> tuple[Any, None, None]:
        # An all-reduce of the whole gathered gradient: gloo has no reduce-scatter.
        # It is [global rows, dim], the size of the candidates themselves.
        gradient = gradient.contiguous().clone()
        dist.all_reduce(gradient)
        offset, rows = ctx.rows
        return gradient[offset : offset + rows], None, None


def all_replicas(values: Any) -> Any:
    """`values` of every process, concatenated on axis 0 in rank order, without
    gradients; unchanged outside a step over several processes."""
    if not in_step():
        return values
    counts = _counts(int(values.shape[0]), values.device)
    return _gather_padded(values.detach(), counts)


def global_negatives(
    candidate_embeddings: Any, candidate_ids: Any, log_q: Any, candidate_mask: Any
) -> tuple[Any, Any, Any, Any, Any]:
    """Every process's batch candidates, and where this process's positives are.

    The embeddings are gathered with their gradient (`_GatherWithGradient`),
    the ids, logQ and mask without. Row i of rank r is column `offset_r + i`,
    `offset_r` the rows of the ranks before r, as on one process scoring the
    global batch in order.

    Returns:
        `(candidate_embeddings, candidate_ids, log_q, candidate_mask,
        positive_positions)`; the arguments unchanged and None positions
        outside a step over several processes.
    """
    if not in_step():
        return candidate_embeddings, candidate_ids, log_q, candidate_mask, None
    rows = int(candidate_embeddings.shape[0])
    counts = _counts(rows, candidate_embeddings.device)
    offset = sum(counts[: rank()])
    gathered = _GatherWithGradient.apply(candidate_embeddings, counts, offset)

    def gather(values: Any) -> Any:
        return None if values is None else _gather_padded(values.detach(), counts)

    positions = torch.arange(offset, offset + rows, device=candidate_embeddings.device)
    return gathered, gather(candidate_ids), gather(log_q), gather(candidate_mask), positions


def replica_loss(loss: Any, rows: Any) -> Any:
    """This process's mean `loss` over its `rows`, scaled to its share of the
    global rows (one all-reduce), so that the gradients summed over processes
    are the gradient of the global mean; unchanged outside a step over several
    processes."""
    if not in_step():
        return loss
    mine = torch.as_tensor(rows, dtype=loss.dtype, device=loss.device).reshape(())
    total = mine.clone()
    dist.all_reduce(total)
    return loss * mine / torch.clamp(total, min=1.0)


def reduce_gradients(
    gradients: Sequence[torch.Tensor | None], loss: torch.Tensor, rows: int
) -> tuple[list[torch.Tensor | None], float, float]:
    """Dense gradients summed over processes in one all-reduce of one flat buffer.

    The logged loss (this process's scaled share) and the rows of its batch
    travel in the same buffer, so that every process can log the global
    batch's mean loss, weighted by its rows, as one process would.

    Returns:
        `(gradients, loss, rows)`: the summed gradients (None where None), the
        global mean loss and the global batch's rows.
    """
    present = [gradient for gradient in gradients if gradient is not None]
    dtype = functools.reduce(torch.promote_types, [g.dtype for g in present], torch.float32)
    scalars = torch.tensor([0.0, float(rows)], dtype=dtype, device=loss.device)
    scalars[0] = loss.detach().reshape(())
    parts = [gradient.reshape(-1).to(dtype) for gradient in present] + [scalars]
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    summed: list[torch.Tensor | None] = []
    start = 0
    for gradient in gradients:
        if gradient is None:
            summed.append(None)
            continue
        size = gradient.numel()
        summed.append(flat[start : start + size].reshape(gradient.shape).to(gradient.dtype))
        start += size
    return summed, float(flat[start]), float(flat[start + 1])


def gather_rows(
    lookups: Sequence[tuple[Any, torch.Tensor, torch.Tensor]],
) -> list[tuple[Any, torch.Tensor, torch.Tensor]]:
    """Each `SparseEmbedding` lookup's `(layer, ids, row gradients)` with the ids
    and gradients of every process (two all-gathers per lookup, after one of
    their sizes): every process then applies the same update, that of the
    global batch's rows. Repeated ids are summed by the update as on one process.
    """
    if not lookups:
        return []
    sizes = [int(ids.shape[0]) for _, ids, _ in lookups]
    table = _every_process(sizes, lookups[0][1].device)  # [process][lookup]
    gathered = []
    for position, (layer, ids, gradients) in enumerate(lookups):
        counts = [row[position] for row in table]
        flat = gradients.reshape(ids.shape[0], gradients.shape[-1])  # (0 rows: no -1)
        gathered.append(
            (layer, _gather_padded(ids, counts), _gather_padded(flat.contiguous(), counts))
        )
    return gathered


def broadcast_state(model: keras.Model) -> None:
    """Every variable of `model` and of its optimizer set to rank 0's values.

    Once per `fit` (its first step), so that processes whose towers were
    initialised with different seeds, or changed on one process only
    (`set_weights` on rank 0), train one model.
    """
    variables = list(model.variables)
    if model.optimizer is not None:
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        variables += list(model.optimizer.variables)
    seen: set[int] = set()
    with torch.no_grad():
        for variable in variables:
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            dist.broadcast(variable.value.data, src=0)


def local_rows(indices: Any) -> Any:
    """This process's block of a global batch's row indices (the first ranks take
    one row more when they do not divide), as one process would order them."""
    size = world_size()
    if size == 1:
        return indices
    count = int(indices.shape[0])
    base, extra = divmod(count, size)
    me = rank()
    start = me * base + min(me, extra)
    return indices[start : start + base + (me < extra)]


def _collective_device() -> torch.device:
    """Where a small tensor of our own must be for a collective: CUDA under NCCL."""
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def shared_seed(seed: int) -> int:
    """Rank 0's `seed` on every process (one broadcast), so that every process
    draws the same epochs' row orders."""
    if world_size() == 1:
        return seed
    value = torch.tensor([seed], dtype=torch.int64, device=_collective_device())
    dist.broadcast(value, src=0)
    return int(value.item())


def check_same(what: str, values: dict[str, int]) -> None:
    """Raises unless every process passes the same `values` (one all-gather).

    A process that cuts other batches than the rest would wait forever in a
    collective of a step the others never take; this turns that into an error
    on every process at once.

    Raises:
        ValueError: naming `what` and each process's values.
    """
    if world_size() == 1:
        return
    every = _every_process([int(value) for value in values.values()], _collective_device())
    rows = [dict(zip(values, row, strict=True)) for row in every]
    if any(row != rows[0] for row in rows):
        listed = "; ".join(f"rank {r}: {row}" for r, row in enumerate(rows))
        raise ValueError(
            f"Every process of the torch process group must call {what} alike, so that "
            f"they cut their shares of the same global batches. Received {listed}"
        )
