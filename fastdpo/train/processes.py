"""The processes of a ``fastdpo train`` run: one, or those ``torchrun`` starts, and how they
split the work (:class:`Layout`: data parallel by sequence parallel)."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch

__all__ = ["Layout", "Processes"]


@dataclass(frozen=True)
class Layout:
    """How a run's processes split its work (:meth:`Processes.layout`): ``dp`` data-parallel
    shards of ``sp`` processes each.  The ``sp`` processes of sequence-parallel group k (ranks
    ``[k*sp, (k+1)*sp)``) read the same micro-batches, data shard ``dp_rank`` = k of ``dp``, and
    split each packed batch's tokens (``sp_mesh``, ``mesh["sp"]`` of a ``(dp, sp)``
    ``DeviceMesh``; None without sequence parallelism).  ``dp_group`` joins the processes of
    one sequence-parallel rank, one per data shard (None: every process, as without sequence
    parallelism): what sums what each data shard counted, once."""

    dp: int
    dp_rank: int
    sp: int = 1
    sp_mesh: object = None
    dp_group: object = None


def check_layout(sequence_parallel: int, world: int) -> None:
    """One-line refusals of a ``--sequence-parallel`` the processes cannot be split by."""
    if sequence_parallel > 1 and world % sequence_parallel:
        raise ValueError(f"--sequence-parallel {sequence_parallel} splits the processes into groups of "
                         f"{sequence_parallel}: torchrun's WORLD_SIZE must be a multiple of it, got {world}")  # fmt: skip


class Processes:
    """This process's place under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``): one
    process when ``WORLD_SIZE`` is unset or 1."""

    def __init__(self, device: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0")) if self.world > 1 else 0
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda" and dev.index is None and self.world > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        self.device = dev
        self.started = False
        if self.world > 1 and not torch.distributed.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
            self.started = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def layout(self, sequence_parallel: int) -> Layout:
        """The :class:`Layout` of ``sequence_parallel`` processes per group (1: plain data
        parallelism, no new process group).  A collective with ``sequence_parallel`` > 1
        (``init_device_mesh`` makes the groups): every process calls it."""
        check_layout(sequence_parallel, self.world)
        if sequence_parallel == 1:
            return Layout(self.world, self.rank)
        from torch.distributed.device_mesh import init_device_mesh

        dp = self.world // sequence_parallel
        mesh = init_device_mesh(self.device.type, (dp, sequence_parallel), mesh_dim_names=("dp", "sp"))
        return Layout(dp, self.rank // sequence_parallel, sequence_parallel, mesh["sp"], mesh["dp"].get_group())

    def sum(self, t: torch.Tensor, group=None) -> torch.Tensor:
        """``t`` summed over ``group`` (None: every process), in place."""
        if self.world > 1:
            torch.distributed.all_reduce(t, group=group)
        return t

    def gather(self, obj) -> list:
        """Every process's ``obj`` on process 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Destroy the process group, after freeing what is unreachable: a sharded model's
        cycles (FSDP2's hooks) freed later, during the interpreter's finalization, can free
        gloo work then and abort the process at exit (pytorch/pytorch#179291).  The caller
        drops its run first."""
        if self.started:
            gc.collect()
            torch.distributed.destroy_process_group()
