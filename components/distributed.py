"""Data-parallel training over processes: torch DistributedDataParallel under `torchrun` (gloo on CPU, NCCL on
GPUs). One process is the default; `compute.processes: N` makes a training stage start itself under torchrun
with N processes, and `torchrun --nproc_per_node=N -m graft stage NAME` does the same by hand.

Every process draws the same global batch and the same augmentation (one generator, one seed), trains on its
own slice of it, and DDP averages the gradients: a step of N processes is a step of one process on the whole
batch, up to BatchNorm's statistics (each process normalises its slice) and the order of float sums. Process 0
(the writer) evaluates, shows progress and writes every output; the others only train.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from components.errors import GraftError


class DistributedError(GraftError, RuntimeError):
    pass


@dataclass(frozen=True)
class Group:
    rank: int
    world_size: int
    local_rank: int

    @property
    def writer(self) -> bool:
        return self.rank == 0


SINGLE = Group(0, 1, 0)


def under_launcher() -> bool:
    """Started by torchrun (or any launcher that sets torch's environment) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Group:
    if not dist.is_available() or not dist.is_initialized():
        return SINGLE
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init(device: str) -> Group:
    """Join the process group torchrun described: gloo for CPU training, NCCL for CUDA (a GPU a process)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    group = current()
    if group.writer:
        print(f"data-parallel training: {group.world_size} processes "
              f"({'NCCL, a GPU each' if device == 'cuda' else 'gloo on the CPU'})", file=sys.stderr, flush=True)
    return group


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(arguments: list[str], processes: int) -> None:
    """`graft ARGUMENTS` under torchrun with `processes` processes on this machine; raises if one fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "graft", *arguments]
    print(f"starting {processes} training processes: torchrun --standalone --nproc_per_node={processes} -m graft "
          f"{' '.join(arguments)}", file=sys.stderr, flush=True)
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise DistributedError(f"the {processes} training processes of `graft {' '.join(arguments)}` failed "
                               f"(exit {done.returncode}; their output is above); set compute.processes: 1 to train "
                               "in this process")


def shard(index: torch.Tensor, group: Group) -> torch.Tensor:
    """This process's slice of a global batch (the batch size is a multiple of the process count)."""
    return index[group.rank :: group.world_size]


def sum_across(values: list[float], group: Group) -> list[float]:
    """Each value summed over the processes (running losses and counts for the log)."""
    if group.world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()
