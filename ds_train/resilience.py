"""Surviving the cluster: preemption signals and non-finite steps, both decided by all ranks together."""

from __future__ import annotations

import math
import os
import signal
from typing import Optional

from ds_train.errors import EXIT_PREEMPTED as PREEMPTED_EXIT  # EX_TEMPFAIL: "try again later"; resume=auto


class Preempted(SystemExit):
    def __init__(self, checkpoint):
        super().__init__(PREEMPTED_EXIT)
        self.checkpoint = checkpoint


class Diverged(RuntimeError):
    """Too many non-finite steps in a row."""


class PreemptionFlag:
    """SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) only set a flag (a handler must not save or communicate); the loop asks
    all ranks at the next step boundary, so every rank saves the same step. A second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # No import here (not even ds_train.dist): the handler may run in the middle of the import of torch.
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if os.environ.get("RANK", "0") == "0":
                print("Ctrl-C: saving a checkpoint at the end of this step, then exiting 75 (Ctrl-C again: stop "
                      "now, without it)", flush=True)

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank got a signal."""
        from ds_train import dist  # not at the top: cli installs the flag before torch is imported

        return dist.all_reduce([1.0 if self.received else 0.0], op="max")[0] > 0


_FLAG: Optional[PreemptionFlag] = None


def preemption_flag() -> PreemptionFlag:
    """The process's one flag. cli installs it first thing in a launched `train`, so a signal during the imports and
    set-up (seconds to minutes before the first step) is kept for the first step boundary instead of killing the
    rank (SIGUSR1's default action)."""
    global _FLAG
    if _FLAG is None:
        _FLAG = PreemptionFlag()
    return _FLAG


class SkipCounter:
    """Steps whose loss or gradient norm was not finite. DeepSpeed skips such an update itself (ZeRO-3 checks the
    global grad norm, which all ranks share); the loss is checked after its all-reduce, so ranks agree on it too."""

    def __init__(self, limit: int):
        self.limit, self.total, self.in_a_row = limit, 0, 0

    def update(self, loss_mean: float, step_applied: bool) -> bool:
        """Record this step; True when it was skipped."""
        skipped = not step_applied or not math.isfinite(loss_mean)
        self.total += skipped
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        return skipped

    def exhausted(self) -> bool:
        return self.in_a_row >= self.limit
