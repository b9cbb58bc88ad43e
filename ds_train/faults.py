"""Deliberate faults for the resilience tests, switched on by DS_TRAIN_FAULT; inert otherwise.

DS_TRAIN_FAULT is a comma-separated list of NAME:STEP[:RANK] entries, e.g.
  nan_loss:3:1       rank 1 computes a NaN loss at step 3 (the ranks must still agree to skip)
  after_shards:4     the process exits (CRASH_EXIT) mid-save at step 4: shards written, `latest` not yet
  error:2            a RuntimeError (a bug, as far as the rest of ds_train knows) at step 2, on every rank
  enospc:4:1         rank 1's first checkpoint write of step 4 fails with OSError(ENOSPC), as on a full disk
  slow_write:4:0     each checkpoint write of rank 0 at step 4 takes SLOW_WRITE_S longer (a peer's failure then
                     happens while it is still writing)
  hold:4             after step 4 every rank waits (up to HOLD_MAX_S) for a preemption signal, as a step that outlasts
                     the wait for SLURM's time-limit warning would (slurmctld checks time limits every 30 s)
  local_output_dir:0:1   rank 1 sees train.output_dir as a private dir of its own (OUTPUT_DIR.rank1-local), as a
                     rank on a node-local disk would (STEP is 0: the check runs at start)
and one entry whose second field is a size, not a step:
  disk_kib:1200      train.output_dir's filesystem holds 1200 KiB: the free space checkpoints see is 1200 KiB minus
                     the bytes under OUTPUT_DIR, and a checkpoint write that leaves more there fails with ENOSPC
                     (a small disk without root to mount one)
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Optional

from ds_train import dist

CRASH_EXIT = 99  # os._exit code of an injected crash: tells it apart from a real failure
SLOW_WRITE_S = 2.0
HOLD_MAX_S = 120.0


def _entries() -> list[list[str]]:
    return [entry.split(":") for entry in filter(None, os.environ.get("DS_TRAIN_FAULT", "").split(","))]


def active(name: str, step: int) -> bool:
    for parts in _entries():
        if parts[0] == name and int(parts[1]) == step and (len(parts) < 3 or int(parts[2]) == dist.rank()):
            return True
    return False


class InjectedError(RuntimeError):
    pass


def raise_if(name: str, step: int) -> None:
    if active(name, step):
        raise InjectedError(f"{name} injected at step {step} (DS_TRAIN_FAULT)")


def crash_if(name: str, step: int) -> None:
    if active(name, step):
        os._exit(CRASH_EXIT)


def before_write(step: int, path: str) -> None:
    """Called before each checkpoint write of this rank: `enospc` fails it."""
    if active("enospc", step):
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by DS_TRAIN_FAULT enospc:{step})", path)


def _disk_bytes() -> Optional[int]:
    sizes = [int(parts[1]) for parts in _entries() if parts[0] == "disk_kib"]
    return sizes[0] * 1024 if sizes else None


def _used(out_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file())


def free_bytes(out_dir: Path, real_free: int) -> int:
    """The free space a save sees: `real_free`, or what `disk_kib` leaves under OUTPUT_DIR."""
    size = _disk_bytes()
    return real_free if size is None else max(0, min(real_free, size - _used(out_dir)))


def after_write(step: int, out_dir: Path, path: str) -> None:
    """Called after each checkpoint write of this rank: `slow_write` waits; under `disk_kib`, a write that overfilled
    the small disk fails."""
    if active("slow_write", step):
        time.sleep(SLOW_WRITE_S)
    size = _disk_bytes()
    if size is not None and _used(out_dir) > size:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (DS_TRAIN_FAULT disk_kib:{size // 1024})", path)


def view_of(out_dir: Path) -> Path:
    """The dir this rank looks in for OUTPUT_DIR: itself, or under `local_output_dir` a private one."""
    if not active("local_output_dir", 0):
        return Path(out_dir)
    private = Path(out_dir).with_name(f"{Path(out_dir).name}.rank{dist.rank()}-local")
    private.mkdir(parents=True, exist_ok=True)
    return private


def hold(step: int, preemption) -> None:
    """`hold`: wait at the end of `step` until a preemption signal reached any rank (`preemption.agreed()`, a
    collective each 0.1 s, the same count on every rank) or HOLD_MAX_S passed."""
    if not active("hold", step):
        return
    for _ in range(int(HOLD_MAX_S / 0.1)):
        if preemption.agreed():
            return
        time.sleep(0.1)
