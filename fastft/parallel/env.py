"""Distributed environment: read the launcher's variables, create (or adopt) the process group, rank helpers.

Runs unchanged on CPU (gloo) and GPU (nccl). If fastft is embedded in a job that already created a process group,
that group is used and left alone at the end."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # True when fastft created the process group (and must destroy it)
    local_world_size: int = 1  # processes on this node
    node_rank: int = 0  # this node's index among the job's nodes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank(rank: int = 0) -> int:
    """This process's index on its node (torchrun / DeepSpeed / Slurm set LOCAL_RANK or SLURM_LOCALID)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", rank)))


def local_world_size(world: int = 1) -> int:
    """Processes on this node (torchrun: LOCAL_WORLD_SIZE; DeepSpeed: LOCAL_SIZE; Slurm: SLURM_NTASKS_PER_NODE)."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return world


def node_rank(rank: int = 0, world: int = 1) -> int:
    """This node's index (torchrun: GROUP_RANK; DeepSpeed: CROSS_RANK; Slurm: SLURM_NODEID); without any of them,
    ranks are taken to be laid out node by node (rank // local_world_size)."""
    for name in ("GROUP_RANK", "NODE_RANK", "CROSS_RANK", "SLURM_NODEID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return rank // max(local_world_size(world), 1)


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_distributed(device_name: str = "auto", *, timeout_s: int = 600) -> DistEnv:
    """Initialise from torchrun / deepspeed launcher variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = local_rank(rank % max(torch.cuda.device_count(), 1))
        device = resolve_device(device_name, local)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistEnv(rank, world, local, device, False, local_world_size(world), node_rank(rank, world))
    world = launched_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return DistEnv(0, 1, 0, device, owns_group=False)
    rank = int(os.environ["RANK"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return DistEnv(rank, world, local, device, True, local_world_size(world), node_rank(rank, world))


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


_CPU_GROUP: list = []


def cpu_group(env: DistEnv):
    """A gloo group over all ranks for CPU tensors (the default group may be NCCL, GPU tensors only). Created once,
    on first use, which is collective: every rank must reach the first call."""
    if not env.distributed:
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    if not _CPU_GROUP or _CPU_GROUP[0] is not dist.group.WORLD:  # a new default group: a new CPU group with it
        _CPU_GROUP[:] = [dist.group.WORLD, dist.new_group(backend="gloo")]
    return _CPU_GROUP[1]


def all_gather_object(env: DistEnv, obj) -> list:
    """Every rank's `obj`, in rank order (collective)."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj, group=cpu_group(env))
    return out


def all_reduce_max(env: DistEnv, value: float) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_object(env: DistEnv, obj):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class StopSignal:
    """SIGTERM / SIGUSR1 ask the run to stop at the next step boundary, after saving its position (the time-limit
    warning of a Slurm job with `--signal`, a preemption, torchrun shutting its workers down).

    Handlers are installed only in the main thread (an embedding program's own handlers are restored by close()).
    Under several ranks the request is agreed at every step (a MAX all-reduce of one CPU integer, on a gloo group,
    so no GPU sync): a signal that reaches one rank first still stops every rank at the same step."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, env: DistEnv) -> None:
        import signal
        import threading

        self.received: str | None = None
        self._previous: dict = {}
        self._group = None
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        if env.distributed:
            # A CPU group for the flag: the default group may be NCCL (GPU tensors only). Collective: every rank.
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        self._flag = torch.zeros(1, dtype=torch.int32)

    def _handle(self, signum, frame) -> None:
        import signal

        self.received = signal.Signals(signum).name

    def requested(self) -> bool:
        """True on every rank once any rank has received a stop signal (collective under several ranks)."""
        if self._group is None:
            return self.received is not None
        self._flag.fill_(self.received is not None)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
        if self._flag.item() and self.received is None:
            self.received = "a stop signal on another rank"
        return bool(self._flag.item())

    def close(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
