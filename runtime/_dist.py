"""The processes of one run: torchrun's environment in, a process group and this process's device out.

moeforge writes no launcher and no collective of its own: torchrun (``torch.distributed.run``) starts the
processes and sets RANK, WORLD_SIZE and LOCAL_RANK; `init_distributed` joins them with
``torch.distributed.init_process_group`` (nccl on CUDA, gloo on CPU) and the trainer uses the process group's
all-reduce. One process (no torchrun, or WORLD_SIZE=1) is `Dist()`: every collective is a no-op.

A process that dies must not leave the others waiting: torchrun stops the rest of the group when one of its
processes exits (they get SIGTERM, which `stop_on_sigterm` turns into `PeerFailed`, so each says why it
stopped), and every collective has a timeout (`MOEFORGE_DIST_TIMEOUT_S`, default 300 s) for what torchrun
cannot see, such as a node that stops answering.
"""

from __future__ import annotations

import datetime
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


class PeerFailed(RuntimeError):
    """Another process of the run failed or was stopped, so this one stops too."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size, rank within its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes the run dir (metrics, summary, checkpoints) and prints."""
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce `t` in place (sum over ranks); returns it."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast(self, obj: object) -> object:
        """Rank 0's `obj`, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def world_from_env() -> int:
    """How many processes torchrun started for this run (WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def current() -> Dist:
    """The run's Dist: from the initialized process group, else one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: str = "auto") -> Dist:
    """Join the run's process group when torchrun started several processes (idempotent); else `Dist()`.

    Args:
        device: the run's device setting; CUDA (auto with a GPU, cuda) means nccl and this process's
            cuda:LOCAL_RANK, anything else gloo.
    """
    if world_from_env() <= 1:
        return Dist()
    if dist.is_initialized():
        return current()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
    timeout = float(os.environ.get("MOEFORGE_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    dist.init_process_group(
        backend="nccl" if cuda else "gloo",
        timeout=datetime.timedelta(seconds=timeout),
        device_id=torch.device("cuda", local_rank) if cuda else None,
    )
    return current()


def close_distributed() -> None:
    """Leave the process group (at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def stop_on_sigterm(d: Dist) -> None:
    """torchrun stops the other processes with SIGTERM when one fails: raise PeerFailed there, so the run
    records how it stopped and the process says why, instead of vanishing."""
    if d.world == 1:
        return

    def handler(_sig: int, _frame: object) -> None:
        # torchrun may signal again while this process writes its summary and says why: let it finish
        # (torchrun sends SIGKILL after its grace period, should it not)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise PeerFailed(
            f"rank {d.rank}: stopped because another process of the run ended (torchrun stopped the rest); "
            "its error is above"
        )

    signal.signal(signal.SIGTERM, handler)
