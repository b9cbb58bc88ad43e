"""Surviving the cluster: preemption signals and non-finite steps, both decided by all ranks together."""

from __future__ import annotations

import math
import signal

from ds_train import dist
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
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            dist.print0("Ctrl-C: saving a checkpoint at the end of this step, then exiting 75 (Ctrl-C again: stop "
                        "now, without it)")

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank got a signal."""
        return dist.all_reduce([1.0 if self.received else 0.0], op="max")[0] > 0


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
