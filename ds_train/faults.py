"""Deliberate faults for the resilience tests, switched on by DS_TRAIN_FAULT; inert otherwise.

DS_TRAIN_FAULT is a comma-separated list of NAME:STEP[:RANK] entries, e.g.
  nan_loss:3:1       rank 1 computes a NaN loss at step 3 (the ranks must still agree to skip)
  after_shards:4     the process exits (CRASH_EXIT) mid-save at step 4: shards written, `latest` not yet
  error:2            a RuntimeError (a bug, as far as the rest of ds_train knows) at step 2, on every rank
"""

from __future__ import annotations

import os

from ds_train import dist

CRASH_EXIT = 99  # os._exit code of an injected crash: tells it apart from a real failure


def active(name: str, step: int) -> bool:
    for entry in filter(None, os.environ.get("DS_TRAIN_FAULT", "").split(",")):
        parts = entry.split(":")
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
