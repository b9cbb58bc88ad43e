"""The one place that knows about ranks: who is main, printing from rank 0, and the collectives the loop needs."""

from __future__ import annotations

import importlib
import os
import sys

import torch
import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def init_distributed() -> None:
    """Start this rank's process group, bound to its device: the one entry every launched subcommand goes through
    (prepare, train, bench-train; samples run inside train's group).

    On GPUs the rank is bound to cuda:LOCAL_RANK before the group starts. torch's object collectives
    (`all_gather_object`, `broadcast_object_list` without `device=`) and DeepSpeed's own ZeRO buffers use the
    *current* device; unbound, every rank of a node would put them on cuda:0, which NCCL rejects as a duplicate GPU.
    DeepSpeed's `device_id` argument to init_process_group does not set the current device. The launcher sets
    LOCAL_RANK in each rank's environment (run.sh's `--no_local_rank` only drops the `--local_rank` argument).

    Without GPUs, deepspeed.init_distributed runs without DeepSpeed's CPU shared-memory all-reduce: DeepSpeed 0.19
    JIT-compiles that C++ op on first use (minutes on a fresh machine) and leaves a 69 MB buffer per rank in /dev/shm
    after every run, which fills RAM over repeated runs. gloo does the same collectives.
    """
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    else:
        # By module name: the attribute deepspeed.comm.torch is the torch package itself.
        ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
        ds_comm_torch.build_shm_op = lambda: None
    deepspeed.init_distributed()


_alone = False  # rank 0 after leave_peers(): out of the process group, finishing by itself


def leave(code: int) -> None:
    """A rank's end in a process group: wait for the peers, destroy the group, and exit with `code` at once.

    Both halves stop gloo from aborting finished runs with "terminate called without an active exception" (rc -6):
    a rank exiting while its peers still held live pairs to it (3 of 6 CPU launches of prepare), and gloo threads
    dying in the interpreter's teardown, since DeepSpeed keeps process groups in module globals (1 train launch in
    a suite run). Everything is written and closed by now. Without a process group this returns (rank 0 after
    leave_peers exits at once too: its group's threads may still be alive).
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    elif not _alone:
        return
    _exit(code)


def leave_peers() -> None:
    """End the process group before work that rank 0 does alone (the end-of-run merge): wait for the peers,
    destroy the group; every rank but 0 exits with 0 here, and rank 0 returns to finish by itself.

    Peers left waiting in a collective while one rank works for minutes are stopped by NCCL's watchdog at the
    process group's timeout (DeepSpeed's default: 10 minutes, DEEPSPEED_TIMEOUT) or at least hold their GPUs for
    nothing. Without a process group this returns.
    """
    global _alone
    if not dist.is_initialized():
        return
    main = is_main()  # the rank comes from the group until it is destroyed
    dist.barrier()
    dist.destroy_process_group()
    if not main:
        _exit(0)
    _alone = True


def in_process_group() -> bool:
    """In a process group, or rank 0 finishing alone after leave_peers (it still exits through leave / abort)."""
    return dist.is_initialized() or _alone


def abort(code: int) -> None:
    """Exit a rank that failed on its own, at once: no barrier (the peers may never reach it) and no interpreter
    teardown, where gloo's threads die with "terminate called without an active exception" (rc 250, 1 in 4 CPU
    launches). The launcher then stops the other ranks. Without a process group this returns."""
    if not in_process_group():
        return
    _exit(code)


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Reduce a few Python floats over all ranks in one collective (identity without a process group)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=_OPS[op])
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce a tensor that lives on this rank's device (identity without a process group)."""
    if not dist.is_initialized():
        return t
    comm = t.to(_comm_device())
    dist.all_reduce(comm, op=_OPS[op])
    return comm.to(t.device)


def broadcast_object(obj):
    """Rank 0's object on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order ([obj] without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)  # takes no device: the current one, bound by init_distributed
    return out


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    return device() if dist.get_backend() == "nccl" else torch.device("cpu")
