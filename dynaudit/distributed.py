"""Layers sharded over the processes of a ``torchrun`` job (torch.distributed).

``torchrun --nproc-per-node N -m dynaudit measure SOURCE …`` starts N copies of the CLI with
``RANK``/``WORLD_SIZE`` (and the rendezvous address) in their environment. Each rank fits its
share of the layer batches, the results are exchanged as Python objects, and every rank ends
with the whole report; only rank 0 prints and writes it. Batching never changes a layer's
numbers (every matrix has its own seed), so a sharded run equals a single-process one within
the thread-count tolerance of docs/method.md §7.

Only small Python objects cross ranks, so the process group always uses gloo (it runs over
TCP on every machine); on GPUs each rank fits on ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Ranks", "assign", "current", "is_main", "require_single_process"]

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def from_main(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def current() -> Ranks | None:
    """The job's ranks when launched with more than one process (``WORLD_SIZE`` > 1), joining
    the process group on first use; None for an ordinary single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend="gloo")
        except (ValueError, RuntimeError) as exc:
            from dynaudit.errors import UsageError

            raise UsageError(
                f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but the torchrun rendezvous failed "
                f"(start the job with torchrun): {str(exc).splitlines()[0]}"
            ) from exc
        atexit.register(_leave)
    return Ranks(dist.get_rank(), dist.get_world_size())


def is_main() -> bool:
    """True in a single process and on rank 0 of a job: the process that reports."""
    ranks = current()
    return ranks is None or ranks.is_main


def require_single_process(command: str) -> None:
    """Commands not sharded yet refuse to run once per rank (N copies of the same work)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from dynaudit.errors import UsageError

        raise UsageError(
            f"{command} is not sharded over torchrun ranks yet: run it as one process "
            "(measure, and check against a stored baseline directory, are)"
        )


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def assign(costs: list[float], size: int) -> list[int]:
    """The rank that fits each batch: the costliest batch first, to the least-loaded rank
    (ties to the lowest rank). Deterministic, so every rank computes the same assignment."""
    load = [0.0] * size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(size), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += costs[i]
    return owner
