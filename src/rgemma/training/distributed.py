"""Data-parallel processes started by torchrun: rank, world size, and their collectives.

In a single process (no WORLD_SIZE, or 1) every helper here is a no-op, so
the training loop reads the same either way.
"""

from __future__ import annotations

import dataclasses
import os

import torch


@dataclasses.dataclass
class Dist:
    """This process's place among ``world`` data-parallel processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum(self, x: float) -> float:
        """``x`` summed over all processes (in float64, so every rank gets the same)."""
        if not self.enabled:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())


def init_distributed(device: str) -> Dist:
    """Joins the process group when started by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return Dist(
        rank=torch.distributed.get_rank(),
        world=torch.distributed.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def wrap_distributed(model, dist: Dist, *, fsdp: bool, device: str):
    """DDP (or FSDP with ``fsdp``) when running under torchrun; else the model itself.

    FSDP shards each block and then the rest in place (needs torch >= 2.6).
    """
    if not dist.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist.local_rank] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (FSDP shards in place: itself)."""
    return getattr(model, "module", model)
