"""Running past one process with ``torchrun`` / ``torch.distributed`` (gloo on CPU, NCCL on GPU).

``torchrun --nproc-per-node N -m dntk run ...`` starts N copies of the job; each reads its rank from
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, set by torchrun). Stages that write a
cached result (data cache, teacher, distilled set, student) run on rank 0 first and then on the
other ranks, which find the result on disk; feature extraction is split by shard (shard i on rank
i mod N); after a barrier rank 0 alone fits and reports.
"""

from __future__ import annotations

import os
from datetime import timedelta
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import DNTKError


@dataclass
class Ranks:
    """rank / world of this process; ``world == 1`` when not under torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    @contextmanager
    def main_first(self):
        """Run the body on rank 0, then (after a barrier) on the other ranks — for stages whose result
        is cached on disk, so the other ranks read it instead of computing it again."""
        if not self.main:
            self.barrier()
        try:
            yield
        finally:
            if self.main:
                self.barrier()

    def device(self, device: str) -> str:
        """``cuda`` means this process's GPU (``cuda:LOCAL_RANK``) under torchrun."""
        if self.world > 1 and device == "cuda":
            return f"cuda:{self.local_rank}"
        return device


def from_environment(device: str = "cpu") -> Ranks:
    """The process group torchrun describes in the environment (initialised once), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_available():
        raise DNTKError("this torch build has no torch.distributed; run without torchrun")
    if not torch.distributed.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        # long first stages (a teacher trained on rank 0 while the others wait) must not time out
        torch.distributed.init_process_group(backend, timeout=timedelta(hours=48))
    return Ranks(rank, world, local)
