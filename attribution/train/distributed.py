"""Several processes (torchrun / torch.distributed), one global batch, one set of values.

Every rank holds the whole model and optimizer (as DDP does) and takes a contiguous slice of each
global batch: rank r gets rows `r*b .. (r+1)*b - 1` of the `world*b` sequences. After the backward
pass the gradients are averaged with one all-reduce per parameter (what DDP's reducer does, done by
hand because the engine needs to run the model's own forward/backward, not a wrapper's). Each rank
values its own slice against the full validation sets; the per-sequence values are then gathered
in rank order, so rank 0 sees the global batch in the same order a single process would.

Launch::

    torchrun --nproc_per_node 2 -m attribution.cli run --corpus builtin --val NAME=PATH --out runs/ddp

(`gloo` on CPU, `nccl` on GPUs; `MASTER_ADDR`/`MASTER_PORT` come from torchrun.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; `world == 1` means no torch.distributed at all."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str = "cpu") -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world=world, local_rank=local_rank)


def shutdown(info: DistInfo) -> None:
    """Leave the process group (lets the next run in the same process start a new one)."""
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (e.g. while rank 0 builds the token cache)."""
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def local_slice(info: DistInfo, global_batch: int) -> slice:
    """Rows of the global batch this rank trains and values."""
    if global_batch % info.world:
        from attribution.errors import UserError

        raise UserError(f"batch size {global_batch} is not divisible by the number of processes {info.world}")
    per = global_batch // info.world
    return slice(info.rank * per, (info.rank + 1) * per)


def average_gradients(info: DistInfo, params) -> None:
    """All-reduce and average `.grad` of every parameter, as DDP would."""
    if not info.enabled:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(info.world)


def average_scalar(info: DistInfo, value: float) -> float:
    """Mean of a Python float over ranks (the global train loss)."""
    if not info.enabled:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / info.world


def sum_over_ranks(info: DistInfo, values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a few numbers, in float64 (counts stay exact below 2**53)."""
    if not info.enabled:
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


def gather_rows(info: DistInfo, array: np.ndarray) -> np.ndarray:
    """Concatenate every rank's `[rows, ...]` float64 array in rank order (same shape on all ranks)."""
    if not info.enabled:
        return array
    import torch
    import torch.distributed as dist

    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(_comm_device())
    parts = [torch.empty_like(t) for _ in range(info.world)]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=0).cpu().numpy()


def _comm_device() -> str:
    """NCCL moves only GPU tensors; gloo moves CPU tensors."""
    import torch
    import torch.distributed as dist

    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
