"""Small helpers over ``torch.distributed``: rank/world, gathering with and without gradients, mean reduction.

All of them work unchanged in a single process (no process group): they return the input / its own value.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one member is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0, keeping the autograd graph to every rank's tensor.

    Uses ``torch.distributed.nn.functional.all_gather``, whose backward sums the gradients that all ranks computed for
    each rank's slice and returns to each rank the gradient of its own slice. Combined with DDP's gradient averaging,
    training on gathered negatives gives the same gradients as one process on the concatenated batch (the loss being
    a mean over queries, with the same number of queries per rank).

    Args:
        t: [n, ...] tensor; every rank must pass the same shape.

    Returns:
        [world * n, ...] tensor, rank 0's rows first.
    """
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)


def gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (e.g. masks) from every rank along dim 0, without gradients."""
    if not is_distributed():
        return t
    src = t.to(torch.uint8) if t.dtype == torch.bool else t  # gloo has no bool collectives
    parts = [torch.empty_like(src) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, src.contiguous())
    out = torch.cat(parts, dim=0)
    return out.bool() if t.dtype == torch.bool else out


def mean_across_ranks(value: float) -> float:
    """Average a Python float over ranks (for logging the global loss)."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce and average ``.grad`` of ``params`` over ranks (what DDP does; used in tests and without DDP)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world
