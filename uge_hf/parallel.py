"""Deterministic data parallelism for the optimizations that build the shared state.

Every step's batch is cut into a fixed number of micro-batches, whatever the number of
processes. Each process computes the gradients of the micro-batches it owns (``k % count ==
index``) from the same weights; every micro-batch's gradient is gathered to every process
and summed there *in micro-batch order*. Floating-point sums depend on their order, so this
is what makes a state built on 1, 2 or N processes the same bytes. Batch-norm running
statistics follow the same rule: each micro-batch starts from the step's statistics and the
step keeps their mean over micro-batches.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

T = TypeVar("T")

@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes sharing the work."""

    index: int = 0
    count: int = 1

    @classmethod
    def current(cls) -> "Ranks":
        """The ``torch.distributed`` group if one is running (Accelerate starts one), else a
        single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.index == 0


def data_parallel_gradients(module: nn.Module, micro_loss: Callable[[int], Optional[torch.Tensor]], micro_batches: int,
                            ranks: Ranks = Ranks()) -> float:
    """Set ``.grad`` of ``module``'s trainable parameters to the gradient of
    ``sum(micro_loss(k) for k in range(micro_batches))``, computed data-parallel; returns that
    sum. ``micro_loss(k)`` returns ``None`` for an empty micro-batch.

    Same result bytes on any number of processes up to ``micro_batches``.
    """
    if ranks.count > micro_batches:
        raise ValueError(f"{ranks.count} processes share micro_batches={micro_batches}: every process needs at least one; "
                         f"set ProtectConfig(micro_batches={ranks.count}) or more (this changes the state's bytes)")
    params = [p for p in module.parameters() if p.requires_grad]
    floats = [b for b in module.buffers() if b.is_floating_point()]
    counters = [b for b in module.buffers() if not b.is_floating_point()]
    start = [b.detach().clone() for b in floats + counters]
    device = params[0].device
    width = sum(p.numel() for p in params) + sum(b.numel() for b in floats) + 2  # gradients, statistics, loss, non-empty
    rows = []
    for k in range(ranks.index, micro_batches, ranks.count):
        with torch.no_grad():
            for b, s in zip(floats + counters, start):
                b.copy_(s)
        loss = micro_loss(k)
        if loss is None:
            rows.append(torch.zeros(width, device=device))
            continue
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).detach().float().flatten() for g, p in zip(grads, params)]
                              + [b.detach().float().flatten() for b in floats] + [loss.detach().float().view(1), torch.ones(1, device=device)]))
    table = gather_rows(torch.stack(rows), micro_batches, ranks)
    total = table[0].clone()
    for row in table[1:]:  # the fixed order
        total += row
    loss, filled = total[-2:].tolist()  # one device sync a step
    with torch.no_grad():
        offset = 0
        for p in params:
            p.grad = total[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
            offset += p.numel()
        for b, s in zip(floats, start):
            b.copy_((total[offset:offset + b.numel()] / filled).view_as(b) if filled else s)
            offset += b.numel()
        for b, s in zip(counters, start[len(floats):]):
            b.copy_(s + (1 if filled and module.training else 0))  # batch-norm's step counter advances once a step
    return loss


def gather_rows(local: torch.Tensor, micro_batches: int, ranks: Ranks) -> torch.Tensor:
    """Every micro-batch's row, in micro-batch order, on every process."""
    if ranks.count == 1:
        return local
    per_rank = math.ceil(micro_batches / ranks.count)
    padded = torch.zeros(per_rank, local.shape[1], device=local.device, dtype=local.dtype)
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(ranks.count)]
    dist.all_gather(parts, padded)
    return torch.stack([parts[k % ranks.count][k // ranks.count] for k in range(micro_batches)])


def share_out(count: int, work: Callable[[int], T], ranks: Ranks) -> list[T]:
    """``[work(k) for k in range(count)]`` on every process: each computes the ``k`` it owns
    (``k % ranks.count == ranks.index``) and the results (pickled: return tensors that own
    their storage, not views of a larger one, which pickle whole) are gathered in ``k`` order.
    For jobs whose result does not depend on the process, such as protecting a batch.

    Results are gathered one wave (one ``k`` per process) at a time: a collective holds only
    that wave's pickles (on the GPU, under NCCL), and a process whose job raises tells the
    others at the wave's end, so that every process raises instead of waiting for it. Each
    wave waits for its slowest job: give the jobs equal sizes.

    Raises:
        RuntimeError: another process's job raised or returned what does not pickle (that
            process re-raises its own error).
    """
    if ranks.count == 1:
        return [work(k) for k in range(count)]
    results: list = []
    for wave in range(0, count, ranks.count):
        k, payload, error = wave + ranks.index, None, None
        try:  # pickled here, so that a result that does not pickle fails like a job that raises
            payload = pickle.dumps(work(k) if k < count else None)
        except Exception as raised:  # told to every process, then re-raised below
            error = raised
        parts: list = [None] * ranks.count
        dist.all_gather_object(parts, (None if error is None else describe(error), payload))
        if error is not None:
            raise error
        if failed := [(i, message) for i, (message, _) in enumerate(parts) if message is not None]:
            raise RuntimeError(f"process {failed[0][0]} failed its share of the work ({failed[0][1]}); see its traceback")
        results += [pickle.loads(p) for _, p in parts[:count - wave]]
    return results


def describe(error: Exception) -> str:
    """``"Type: message"``, or the type alone for an error whose message cannot be formed."""
    try:
        return f"{type(error).__name__}: {error}"
    except Exception:
        return type(error).__name__
